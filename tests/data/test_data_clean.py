"""Normalisation and each Gopher/C4 quality rule, with the n-gram statistics against brute force."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from lmstack.data.clean import (QualityConfig, QualityFilter, _word_ids, duplicate_ngram_char_fraction, normalize,
                                top_ngram_char_fraction)

PROSE = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
         "want of a wife. However little known the feelings or views of such a man may be on his first entering "
         "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
         "considered the rightful property of some one or other of their daughters.\n"
         "My dear Mr. Bennet, said his lady to him one day, have you heard that Netherfield Park is let at last?")


def test_normalize() -> None:
    # decomposed e + combining acute -> precomposed U+00E9; CRLF; NUL and BOM dropped; NBSP -> space;
    # trailing spaces stripped; 4 newlines -> one blank line
    raw = "\ufeffcafe\u0301\r\nline\x00 two\u00a0x   \n\n\n\nend  "
    assert normalize(raw) == "caf\u00e9\nline two x\n\nend"
    assert normalize("  \t\n ") == ""


def _brute_duplicate_fraction(words: list[str], n: int) -> float:
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = set()
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered.update(range(i, i + n))
    return sum(len(words[i]) for i in covered) / sum(len(w) for w in words)


def _brute_top_fraction(words: list[str], n: int) -> float:
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    gram, count = max(counts.items(), key=lambda kv: kv[1])
    return 0.0 if count < 2 else count * sum(len(w) for w in gram) / sum(len(w) for w in words)


@pytest.mark.parametrize("seed", range(5))
def test_ngram_statistics_match_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    vocab = ["a", "bb", "ccc", "dddd", "the", "cat", "sat"]
    words = [rng.choice(vocab) for _ in range(300)]
    lengths = np.array([len(w) for w in words])
    ids, total = _word_ids(words), float(lengths.sum())
    for n in (2, 3, 5, 8):
        assert duplicate_ngram_char_fraction(ids, lengths, n, total) == pytest.approx(_brute_duplicate_fraction(words, n))
    for n in (2, 3, 4):
        # ties for the most frequent n-gram may differ in length; compare against all maxima
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        best = max(counts.values())
        allowed = {best * sum(map(len, g)) / total for g, c in counts.items() if c == best}
        got = top_ngram_char_fraction(ids, lengths, n, total)
        assert any(got == pytest.approx(a) for a in allowed), (n, got, allowed)


def test_prose_passes_every_rule() -> None:
    assert QualityFilter(QualityConfig()).first_failure(normalize(PROSE)) is None


@pytest.mark.parametrize("text, rule", [
    ("too short to keep", "min_words"),
    (" ".join(["a"] * 60), "min_mean_word_length"),
    (" ".join(["internationalisation"] * 60), "max_mean_word_length"),
    (PROSE + " #tag" * 30, "max_symbol_word_ratio"),
    ("\n".join(f"- item number {i} of the list." for i in range(60)), "max_bullet_line_fraction"),
    ("\n".join(f"and then the story went on and on for a while longer {i}..." for i in range(60)), "max_ellipsis_line_fraction"),
    (PROSE + " " + " ".join(["1234", "5678", "90"] * 40), "min_alpha_word_fraction"),
    ("\n".join(f"word{i} another token here then more" for i in range(60)), "min_punct_line_fraction"),
    ("\n".join(["The same line again and again."] * 30 + [PROSE]), "max_duplicate_line_fraction"),
])
def test_each_rule_fires(text: str, rule: str) -> None:
    assert QualityFilter(QualityConfig()).first_failure(normalize(text)) == rule


def test_repetition_rules_and_disabling() -> None:
    # the same paragraph twice on one line: no duplicate *lines*, but every 5-gram repeats
    doubled = PROSE.replace("\n", " ") + " " + PROSE.replace("\n", " ")
    cfg = QualityConfig()
    assert QualityFilter(cfg).first_failure(doubled) == "max_duplicate_ngram_char_fraction"
    cfg.max_duplicate_ngram_char_fraction = {}
    assert QualityFilter(cfg).first_failure(doubled) is None
    spam = " ".join(["buy cheap watches"] * 20 + PROSE.split())
    assert QualityFilter(QualityConfig()).first_failure(spam) == "max_top_ngram_char_fraction"
    assert QualityFilter(QualityConfig(min_words=None)).first_failure("short but fine.") is None


@pytest.mark.parametrize("seed", range(20))
def test_duplicate_ngram_shortcut_agrees_with_checking_every_n(seed: int) -> None:
    rng = random.Random(seed)
    vocab = ["x" * (i % 7 + 1) + str(i) for i in range(rng.choice([4, 30, 150, 1000]))]  # repetitive .. not
    words = [rng.choice(vocab) for _ in range(rng.randint(5, 200))]
    lengths = np.array([len(w) for w in words])
    ids, total = _word_ids(words), float(lengths.sum())
    limits = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    full = any(duplicate_ngram_char_fraction(ids, lengths, n, total) > lim for n, lim in limits.items())
    fractions = [duplicate_ngram_char_fraction(ids, lengths, n, total) for n in sorted(limits)]
    assert fractions == sorted(fractions, reverse=True)  # the monotonicity the shortcut relies on
    quality = QualityFilter(QualityConfig(max_duplicate_ngram_char_fraction=limits))
    assert quality._fails_duplicate_ngrams(ids, lengths, total) == full
