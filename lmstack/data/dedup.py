"""Exact and near-duplicate detection: normalised-text hashing, MinHash signatures, LSH banding.

Exact: a document whose case-folded, whitespace-collapsed text hashes (BLAKE2b-128) like an earlier
one is a duplicate.

Near: documents are sets of word n-grams ("shingles", n=5 by default). MinHash (Broder 1997) turns a
set into P minimums of P independent hash functions, so P(two signatures agree at i) = Jaccard(A, B).
LSH splits the P values into b bands of r rows; documents sharing any whole band are candidates,
which happens with probability 1 - (1 - J^r)^b. `choose_bands` picks the largest r for which that
probability is still >= `min_candidate_recall` at the threshold, so few true duplicates are missed;
each candidate is then *verified* with the exact Jaccard of the two shingle sets, so precision does
not depend on the signature's sampling noise. `NearDuplicateIndex` holds one signature band table
(O(documents) memory, not O(text)) and asks its caller for a candidate's text only on a band hit.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")


@dataclass
class DedupConfig:
    """Which dedup stages run, and the near-duplicate definition."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # Jaccard similarity of shingle sets at or above which a document is a near-duplicate
    num_perm: int = 128  # MinHash signature length P
    shingle_size: int = 5  # words per shingle
    min_candidate_recall: float = 0.99  # LSH band choice: P(candidate | J = threshold) at least this
    seed: int = 1


def exact_key(text: str) -> bytes:
    """16-byte hash of the case-folded, whitespace-collapsed text: equal for trivially different copies."""
    canonical = _SPACE.sub(" ", text.casefold()).strip()
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=16).digest()


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """Text -> sorted unique uint64 hashes (S,) of its word n-grams (lower-cased \\w+ words).

    A text of fewer than n words is one shingle (all its words), so short texts still compare.
    """
    words = _WORD.findall(text.lower())
    if not words:
        return np.zeros(0, dtype=np.uint64)
    ids = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words))
    n = min(n, len(ids))
    keys = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    mult = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: odd, spreads bits
    with np.errstate(over="ignore"):
        for j in range(n):
            keys = (keys ^ ids[j:len(ids) - n + 1 + j]) * mult
    return np.unique(keys)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique hash arrays."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


class MinHasher:
    """P independent hash functions h_i(x) = splitmix64(x XOR seed_i) and their minimums over a set.

    (A linear family (a*x + b) mod p needs 128-bit products to wrap properly; kept inside 64 bits it
    barely wraps, the minimum then tracks the smallest x for every i, and the estimate's variance
    is several times the binomial J(1-J)/P. The splitmix64 finaliser behaves like a random function.)
    """

    def __init__(self, num_perm: int, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.seeds = rng.integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64, endpoint=True)
        self.num_perm = num_perm

    def signature(self, shingles: np.ndarray, block: int = 2048) -> np.ndarray:
        """(S,) uint64 shingle hashes -> (P,) uint64 signature; blocks of S bound memory to block*P*8 bytes."""
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for start in range(0, len(shingles), block):
                z = shingles[start:start + block, None] ^ self.seeds[None, :]  # (s, P)
                z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
                z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
                z ^= z >> np.uint64(31)
                np.minimum(sig, z.min(axis=0), out=sig)
        return sig


def choose_bands(num_perm: int, threshold: float, min_recall: float) -> tuple[int, int]:
    """(bands b, rows r), b*r <= P: the largest r with P(candidate | J=threshold) >= min_recall."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= min_recall:
            best = (bands, rows)
    return best


class NearDuplicateIndex:
    """LSH band tables over the signatures of kept documents, with exact-Jaccard verification.

    `fetch_shingles(doc_id)` returns a kept document's shingles on demand (the pipeline re-reads its
    text from the spool), so the index never stores text or shingle sets.
    """

    def __init__(self, config: DedupConfig, fetch_shingles: Callable[[int], np.ndarray]) -> None:
        self.config = config
        self.bands, self.rows = choose_bands(config.num_perm, config.threshold, config.min_candidate_recall)
        self.fetch_shingles = fetch_shingles
        # band key -> the kept document holding it, or a list of them when several do (rare: an int
        # per entry keeps the common case small)
        self.tables: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
        self.candidates_checked = 0

    def _band_keys(self, signature: np.ndarray) -> list[int]:
        """(P,) signature -> one 64-bit hash per band of r rows (a collision only costs a verification)."""
        rows = signature[:self.bands * self.rows].reshape(self.bands, self.rows)  # (b, r)
        keys = np.zeros(self.bands, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(self.rows):
                keys = (keys ^ rows[:, j]) * np.uint64(0x9E3779B97F4A7C15)
        return keys.tolist()

    def find(self, signature: np.ndarray, shingles: np.ndarray | Callable[[], np.ndarray]) -> int | None:
        """The id of a kept document with Jaccard >= threshold to the new document, or None.

        `shingles` is the new document's shingle array, or a function computing it: it is then called
        only on a band hit, so the common no-candidate case costs no shingling.
        """
        tried: set[int] = set()
        for table, key in zip(self.tables, self._band_keys(signature)):
            holders = table.get(key)
            if holders is None:
                continue
            for other in [holders] if isinstance(holders, int) else holders:
                if other in tried:
                    continue
                tried.add(other)
                self.candidates_checked += 1
                if callable(shingles):
                    shingles = shingles()
                if jaccard(shingles, self.fetch_shingles(other)) >= self.config.threshold:
                    return other
        return None

    def add(self, doc_id: int, signature: np.ndarray) -> None:
        """Index a kept document under each of its band keys."""
        for table, key in zip(self.tables, self._band_keys(signature)):
            holders = table.get(key)
            if holders is None:
                table[key] = doc_id
            elif isinstance(holders, int):
                table[key] = [holders, doc_id]
            else:
                holders.append(doc_id)
