"""Normalise text and apply Gopher/C4-style quality filters.

`normalize` makes the text canonical (Unicode NFC, one newline convention, no control characters,
no trailing spaces, at most one blank line in a row) so that exact dedup and tokenisation see one
spelling of each string. `QualityFilter` then rejects documents by the heuristics of Gopher
(Rae et al. 2021, appendix A: word counts, mean word length, symbol ratio, bullet/ellipsis lines,
alphabetic words, repeated lines and n-grams) and C4 (Raffel et al. 2020: lines ending in terminal
punctuation). Each rule is one field of `QualityConfig`; `None` turns it off. A document is charged
to the first rule it fails (in the order of `QualityFilter.RULES`), so drop counts add up.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np

# Control characters (Unicode category Cc) except tab and newline, plus the zero-width/BOM
# characters that only ever appear in scraped text by accident.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\ufeff]")
# Unicode space separators (category Zs) other than the ASCII space: NBSP, thin space, ideographic space...
_ODD_SPACE = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_RUN = re.compile(r"\n{3,}")
_TERMINAL_PUNCT = (".", "!", "?", '"', "'", "\u201d", "\u2019", ":", ";", ")")
_BULLETS = ("*", "-", "\u2022", "\u2023", "\u25e6", "\u2043")


def normalize(text: str) -> str:
    """NFC; CRLF/CR -> LF; drop control chars; odd spaces -> ' '; strip line ends; <= 1 blank line in a row."""
    text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _ODD_SPACE.sub(" ", text)
    text = _TRAILING_SPACE.sub("\n", text)
    text = _BLANK_RUN.sub("\n\n", text)
    return text.strip()


@dataclass
class QualityConfig:
    """Thresholds of each quality rule; `None` disables that rule. Defaults follow Gopher unless noted."""

    min_words: int | None = 50
    # Gopher uses 100k; raised so that whole books (Moby-Dick has 215k words) pass as one document.
    max_words: int | None = 1_000_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1  # '#' and '...' per word
    max_bullet_line_fraction: float | None = 0.9
    max_ellipsis_line_fraction: float | None = 0.3
    min_alpha_word_fraction: float | None = 0.8  # words holding at least one letter; the rest is "non-alphabetic"
    # C4 drops *lines* not ending in punctuation; as a document rule it needs a low bar, because
    # hard-wrapped prose (Gutenberg, docstrings) ends most lines mid-sentence.
    min_punct_line_fraction: float | None = 0.05
    max_duplicate_line_fraction: float | None = 0.3
    max_duplicate_line_char_fraction: float | None = 0.2
    # {n: max fraction of word characters inside the single most frequent n-gram}
    max_top_ngram_char_fraction: dict[int, float] = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    # {n: max fraction of word characters inside n-grams that occur more than once}
    max_duplicate_ngram_char_fraction: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})


class QualityFilter:
    """`QualityFilter(cfg).first_failure(text)` -> the name of the first rule the text fails, or None."""

    RULES = ("min_words", "max_words", "min_mean_word_length", "max_mean_word_length", "max_symbol_word_ratio",
             "max_bullet_line_fraction", "max_ellipsis_line_fraction", "min_alpha_word_fraction",
             "min_punct_line_fraction", "max_duplicate_line_fraction", "max_duplicate_line_char_fraction",
             "max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction")

    def __init__(self, config: QualityConfig) -> None:
        self.config = config

    def first_failure(self, text: str) -> str | None:
        c = self.config
        words = text.split()
        n = len(words)
        if c.min_words is not None and n < c.min_words:
            return "min_words"
        if c.max_words is not None and n > c.max_words:
            return "max_words"
        if n == 0:
            return None
        lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=n)
        mean_len = float(lengths.mean())
        if c.min_mean_word_length is not None and mean_len < c.min_mean_word_length:
            return "min_mean_word_length"
        if c.max_mean_word_length is not None and mean_len > c.max_mean_word_length:
            return "max_mean_word_length"
        if c.max_symbol_word_ratio is not None:
            symbols = text.count("#") + text.count("...") + text.count("\u2026")
            if symbols / n > c.max_symbol_word_ratio:
                return "max_symbol_word_ratio"
        lines = [line.strip() for line in text.split("\n")]
        lines = [line for line in lines if line]
        if lines:
            if c.max_bullet_line_fraction is not None:
                bullets = sum(line.startswith(_BULLETS) for line in lines)
                if bullets / len(lines) > c.max_bullet_line_fraction:
                    return "max_bullet_line_fraction"
            if c.max_ellipsis_line_fraction is not None:
                ellipsis = sum(line.endswith(("...", "\u2026")) for line in lines)
                if ellipsis / len(lines) > c.max_ellipsis_line_fraction:
                    return "max_ellipsis_line_fraction"
        if c.min_alpha_word_fraction is not None:
            alpha = sum(any(ch.isalpha() for ch in w) for w in words)
            if alpha / n < c.min_alpha_word_fraction:
                return "min_alpha_word_fraction"
        if lines and c.min_punct_line_fraction is not None:
            punct = sum(line.endswith(_TERMINAL_PUNCT) for line in lines)
            if punct / len(lines) < c.min_punct_line_fraction:
                return "min_punct_line_fraction"
        if lines and (c.max_duplicate_line_fraction is not None or c.max_duplicate_line_char_fraction is not None):
            dup_lines, dup_chars = duplicate_line_stats(lines)
            if c.max_duplicate_line_fraction is not None and dup_lines > c.max_duplicate_line_fraction:
                return "max_duplicate_line_fraction"
            if c.max_duplicate_line_char_fraction is not None and dup_chars > c.max_duplicate_line_char_fraction:
                return "max_duplicate_line_char_fraction"
        if c.max_top_ngram_char_fraction or c.max_duplicate_ngram_char_fraction:
            ids = _word_ids(words)
            total_chars = float(lengths.sum())
            for k, limit in sorted(c.max_top_ngram_char_fraction.items()):
                if top_ngram_char_fraction(ids, lengths, k, total_chars) > limit:
                    return "max_top_ngram_char_fraction"
            if self._fails_duplicate_ngrams(ids, lengths, total_chars):
                return "max_duplicate_ngram_char_fraction"
        return None

    def _fails_duplicate_ngrams(self, ids: np.ndarray, lengths: np.ndarray, total_chars: float) -> bool:
        limits = sorted(self.config.max_duplicate_ngram_char_fraction.items())
        if not limits:
            return False
        # The words covered by repeated (n+1)-grams are a subset of those covered by repeated n-grams,
        # so the fraction only falls as n grows: under every limit at the smallest n means under each
        # limit at its own n. Most documents stop here, after one n instead of six.
        first_n = limits[0][0]
        first = duplicate_ngram_char_fraction(ids, lengths, first_n, total_chars)
        if first <= min(limit for _, limit in limits):
            return False
        return any((first if k == first_n else duplicate_ngram_char_fraction(ids, lengths, k, total_chars)) > limit
                   for k, limit in limits)


def duplicate_line_stats(lines: list[str]) -> tuple[float, float]:
    """(fraction of lines that repeat an earlier line, fraction of characters in such lines)."""
    seen: set[str] = set()
    dup_count = dup_chars = total_chars = 0
    for line in lines:
        total_chars += len(line)
        if line in seen:
            dup_count += 1
            dup_chars += len(line)
        else:
            seen.add(line)
    return dup_count / len(lines), dup_chars / max(total_chars, 1)


def _word_ids(words: list[str]) -> np.ndarray:
    """Words -> dense int64 ids (N,), equal words equal ids; n-grams are then hashed arithmetically."""
    vocab: dict[str, int] = {}
    return np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), dtype=np.int64, count=len(words))


def _ngram_keys(ids: np.ndarray, n: int) -> np.ndarray:
    """(N,) word ids -> (N-n+1,) uint64 keys, one per n-gram (polynomial hash; collisions are ~2^-64)."""
    keys = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    mult = np.uint64(0x100000001B3)  # FNV prime: odd, so the map is a bijection per step
    with np.errstate(over="ignore"):
        for j in range(n):
            keys = keys * mult + ids[j:len(ids) - n + 1 + j].astype(np.uint64) + np.uint64(1)
    return keys


def top_ngram_char_fraction(ids: np.ndarray, lengths: np.ndarray, n: int, total_chars: float) -> float:
    """Characters covered by all occurrences of the most frequent n-gram / all word characters (Gopher)."""
    if len(ids) < n or total_chars == 0:
        return 0.0
    keys = _ngram_keys(ids, n)
    uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
    best = int(np.argmax(counts))
    if counts[best] < 2:
        return 0.0
    start = int(first[best])
    return float(counts[best] * lengths[start:start + n].sum()) / total_chars


def duplicate_ngram_char_fraction(ids: np.ndarray, lengths: np.ndarray, n: int, total_chars: float) -> float:
    """Characters of words covered by any n-gram that occurs more than once / all word characters (Gopher).

    A word inside several repeated n-grams counts once, so the fraction is at most 1.
    """
    if len(ids) < n or total_chars == 0:
        return 0.0
    keys = _ngram_keys(ids, n)
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    repeated = counts[inverse] > 1  # (N-n+1,) n-gram starting at i occurs elsewhere too
    # word i is covered when any n-gram starting in [i-n+1, i] is repeated: a running window sum
    starts = np.concatenate([[0], np.cumsum(repeated, dtype=np.int64)])
    idx = np.arange(len(ids))
    hi = np.minimum(idx, len(repeated) - 1) + 1
    lo = np.maximum(idx - n + 1, 0)
    covered = starts[hi] - starts[np.minimum(lo, hi)] > 0
    return float(lengths[covered].sum()) / total_chars
