"""Near-duplicate dedup: throughput (documents/s) and precision/recall on planted near-duplicates.

Real paragraphs (Gutenberg by default) plus edited copies of some of them, inserted later in the
stream with word-level edits that spread their Jaccard similarity over about [0.5, 1]. The truth
for every document is computed exactly and independently (Python sets of word 5-gram tuples,
against every earlier document that shares a 5-gram): it is a duplicate when some earlier document
has Jaccard >= the threshold. lmstack (MinHash + LSH + exact verification, single process) and the
peer, datasketch (MinHash + MinHashLSH, a document is a duplicate when LSH returns a candidate),
each stream the documents once, keeping the first of each group. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from lmstack.data.dedup import DedupConfig, MinHasher, NearDuplicateIndex, shingle_hashes

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "gutenberg_nltk"
WORD = re.compile(r"\w+")


def load_paragraphs(directory: Path, min_words: int, limit: int) -> list[str]:
    paragraphs = []
    for path in sorted(directory.glob("*.txt")):
        for para in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            if len(para.split()) >= min_words:
                paragraphs.append(" ".join(para.split()))
    random.Random(0).shuffle(paragraphs)
    return paragraphs[:limit]


def plant(paragraphs: list[str], copies: int, max_edit: float, rng: random.Random) -> list[str]:
    """Insert `copies` edited copies (replace/insert/delete a fraction <= max_edit of words) after their originals."""
    docs = list(paragraphs)
    vocab = [w for p in paragraphs[:200] for w in p.split()]
    for _ in range(copies):
        source = rng.randrange(len(paragraphs))
        words = paragraphs[source].split()
        for _ in range(int(round(rng.uniform(0, max_edit) * len(words)))):
            op, i = rng.random(), rng.randrange(len(words))
            if op < 0.6:
                words[i] = rng.choice(vocab)
            elif op < 0.8:
                words.insert(i, rng.choice(vocab))
            elif len(words) > 10:
                del words[i]
        position = docs.index(paragraphs[source]) + 1
        docs.insert(rng.randint(position, len(docs)), " ".join(words))
    return docs


def reference_truth(docs: list[str], threshold: float, n: int) -> list[bool]:
    """Exact: is each document's Jaccard to some earlier document >= threshold? (inverted index of 5-grams)"""
    postings: dict[tuple[str, ...], list[int]] = defaultdict(list)
    sets: list[set[tuple[str, ...]]] = []
    truth = []
    for d, text in enumerate(docs):
        words = WORD.findall(text.lower())
        grams = {tuple(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))}
        candidates = {e for g in grams for e in postings.get(g, ())}
        truth.append(any(len(grams & sets[e]) / len(grams | sets[e]) >= threshold for e in candidates))
        sets.append(grams)
        for g in grams:
            postings[g].append(d)
    return truth


def run_lmstack(docs: list[str], cfg: DedupConfig) -> tuple[list[bool], float]:
    hasher = MinHasher(cfg.num_perm, cfg.seed)
    kept: dict[int, str] = {}
    index = NearDuplicateIndex(cfg, lambda i: shingle_hashes(kept[i], cfg.shingle_size))
    dropped = []
    t0 = time.perf_counter()
    for d, text in enumerate(docs):
        shingles = shingle_hashes(text, cfg.shingle_size)
        sig = hasher.signature(shingles)
        dup = index.find(sig, shingles) is not None
        dropped.append(dup)
        if not dup:
            kept[d] = text
            index.add(d, sig)
    return dropped, time.perf_counter() - t0


def run_datasketch(docs: list[str], cfg: DedupConfig) -> tuple[list[bool], float] | None:
    try:
        from datasketch import MinHash, MinHashLSH
    except ImportError:
        return None
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    dropped = []
    t0 = time.perf_counter()
    for d, text in enumerate(docs):
        words = WORD.findall(text.lower())
        n = min(cfg.shingle_size, len(words))
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        m.update_batch([" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)])
        dup = bool(lsh.query(m))
        dropped.append(dup)
        if not dup:
            lsh.insert(str(d), m)
    return dropped, time.perf_counter() - t0


def score(dropped: list[bool], truth: list[bool]) -> tuple[float, float]:
    tp = sum(p and t for p, t in zip(dropped, truth))
    return tp / max(sum(dropped), 1), tp / max(sum(truth), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a directory of .txt files")
    parser.add_argument("--documents", type=int, default=4000, help="original paragraphs")
    parser.add_argument("--copies", type=int, default=1000, help="planted near-duplicates")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data}: no such directory (pass --data)")
    docs = plant(load_paragraphs(args.data, 30, args.documents), args.copies, 0.06, random.Random(1))
    cfg = DedupConfig(threshold=args.threshold)
    truth = reference_truth(docs, cfg.threshold, cfg.shingle_size)

    ours_time, peer_time = float("inf"), float("inf")
    peer = None
    for _ in range(args.repeats):
        ours, seconds = run_lmstack(docs, cfg)
        ours_time = min(ours_time, seconds)
        result = run_datasketch(docs, cfg)
        if result is not None:
            peer, seconds = result
            peer_time = min(peer_time, seconds)
    precision, recall = score(ours, truth)
    line = {
        "benchmark": "dedup", "documents": len(docs), "planted_copies": args.copies, "true_duplicates": sum(truth),
        "threshold": cfg.threshold, "num_perm": cfg.num_perm,
        "lmstack_docs_per_s": round(len(docs) / ours_time, 1),
        "lmstack_precision": round(precision, 4), "lmstack_recall": round(recall, 4),
        "peer": None, "peer_docs_per_s": None, "peer_precision": None, "peer_recall": None, "ratio": None,
        "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
    }
    if peer is not None:
        import datasketch
        peer_precision, peer_recall = score(peer, truth)
        line.update(peer=f"datasketch {datasketch.__version__} MinHash + MinHashLSH",
                    peer_docs_per_s=round(len(docs) / peer_time, 1), peer_precision=round(peer_precision, 4),
                    peer_recall=round(peer_recall, 4), ratio=round(peer_time / ours_time, 3))
    print(json.dumps(line))


if __name__ == "__main__":
    main()
