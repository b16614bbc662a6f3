"""Exact keys, MinHash estimates, LSH banding, and near-dup precision/recall on planted duplicates."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmstack.data.dedup import (DedupConfig, MinHasher, NearDuplicateIndex, choose_bands, exact_key, jaccard,
                                shingle_hashes)


def _reference_jaccard(a: str, b: str, n: int = 5) -> float:
    """Plain-Python Jaccard of word n-gram sets: the definition the hashed version must reproduce."""
    def grams(t: str) -> set[tuple[str, ...]]:
        w = t.lower().split()
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def _vocab(rng: random.Random, size: int = 4000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return sorted({"".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(size)})


def _mutate(words: list[str], fraction: float, vocab: list[str], rng: random.Random) -> list[str]:
    out = list(words)
    for i in rng.sample(range(len(out)), int(round(fraction * len(out)))):
        out[i] = rng.choice(vocab)
    return out


def test_exact_key_ignores_case_and_spacing() -> None:
    assert exact_key("Hello   World\n") == exact_key("hello world")
    assert exact_key("hello world") != exact_key("hello, world")


def test_shingle_jaccard_equals_reference_and_minhash_estimates_it() -> None:
    rng = random.Random(0)
    vocab = _vocab(rng)
    hasher = MinHasher(256, seed=3)
    for fraction in (0.0, 0.02, 0.05, 0.1, 0.3):
        base = [rng.choice(vocab) for _ in range(400)]
        a, b = " ".join(base), " ".join(_mutate(base, fraction, vocab, rng))
        ha, hb = shingle_hashes(a, 5), shingle_hashes(b, 5)
        true_j = _reference_jaccard(a, b)
        assert jaccard(ha, hb) == pytest.approx(true_j)
        estimate = float(np.mean(hasher.signature(ha) == hasher.signature(hb)))
        sigma = max(np.sqrt(true_j * (1 - true_j) / 256), 1e-3)
        assert abs(estimate - true_j) < 4 * sigma + 1e-9, (fraction, estimate, true_j)


def test_choose_bands_meets_the_recall_target() -> None:
    bands, rows = choose_bands(128, 0.8, 0.99)
    assert bands * rows <= 128
    assert 1 - (1 - 0.8 ** rows) ** bands >= 0.99
    assert 1 - (1 - 0.8 ** (rows + 1)) ** (128 // (rows + 1)) < 0.99  # rows is the largest that works


def test_planted_near_duplicates_precision_and_recall() -> None:
    """300 distinct documents then 300 edited copies with Jaccard spread over [0.5, 1]; the ones at
    >= 0.8 (by the reference definition) must be found (recall >= 0.95), the rest kept (precision >= 0.95)."""
    rng = random.Random(1)
    vocab = _vocab(rng)
    bases = [[rng.choice(vocab) for _ in range(rng.randint(80, 300))] for _ in range(300)]
    copies = []
    for words in bases:
        copy = _mutate(words, rng.uniform(0.0, 0.06), vocab, rng)
        copies.append((" ".join(copy), _reference_jaccard(" ".join(words), " ".join(copy))))
    texts = [" ".join(w) for w in bases]
    cfg = DedupConfig(threshold=0.8, num_perm=128)
    hasher = MinHasher(cfg.num_perm, cfg.seed)
    index = NearDuplicateIndex(cfg, lambda i: shingle_hashes(texts[i], cfg.shingle_size))
    for i, text in enumerate(texts):
        sh = shingle_hashes(text, cfg.shingle_size)
        assert index.find(hasher.signature(sh), sh) is None  # unrelated documents are never duplicates
        index.add(i, hasher.signature(sh))
    tp = fp = fn = 0
    for text, true_j in copies:
        sh = shingle_hashes(text, cfg.shingle_size)
        found = index.find(hasher.signature(sh), sh) is not None
        tp += found and true_j >= 0.8
        fp += found and true_j < 0.8
        fn += (not found) and true_j >= 0.8
    positives = tp + fn
    assert 60 < positives < 240  # the planted set straddles the threshold
    assert tp / positives >= 0.95 and tp / max(tp + fp, 1) >= 0.95, (tp, fp, fn)
