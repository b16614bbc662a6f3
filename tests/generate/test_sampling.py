"""Samplers against transformers' logits warpers: chi-square tests of the empirical distribution, penalties."""

from __future__ import annotations

import pytest
import torch

from lmstack.generate.config import GenerationConfig
from lmstack.generate.sampling import TokenCounts, apply_penalties, filter_logits, next_tokens, sample_from_logits

V, DRAWS = 12, 40_000
LOGITS = torch.tensor([2.0, 1.5, 1.4, 1.0, 0.7, 0.5, 0.0, -0.3, -0.5, -1.0, -2.0, -3.0])


def _reference_probs(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """The filtered softmax as transformers computes it (its warpers, in its order)."""
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    scores = LOGITS[None].clone()
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p > 0.0:
        warpers.append(MinPLogitsWarper(min_p))
    for warper in warpers:
        scores = warper(torch.zeros(1, 1, dtype=torch.long), scores)
    return scores.softmax(-1)[0]


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(X >= statistic) for the chi-square goodness-of-fit over the tokens with probability > 0."""
    support = probs > 0
    expected = probs[support] * counts.sum()
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), statistic / 2.0))


def _draw(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed: int = 0
          ) -> torch.Tensor:
    config = GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    generator = torch.Generator().manual_seed(seed)
    tokens = next_tokens(LOGITS.expand(DRAWS, V).clone(), config, None, generator)
    return torch.bincount(tokens, minlength=V).float()


@pytest.mark.parametrize("options", [
    dict(temperature=1.0), dict(temperature=0.6), dict(temperature=1.7), dict(top_k=3), dict(top_k=5, temperature=0.8),
    dict(top_p=0.7), dict(top_p=0.9, temperature=1.3), dict(min_p=0.2), dict(min_p=0.05, temperature=0.7),
    dict(top_k=6, top_p=0.8, min_p=0.1, temperature=1.2),
])
def test_empirical_distribution_matches_filtered_softmax(options):
    expected = _reference_probs(**options)
    counts = _draw(**options)
    assert (counts[expected == 0] == 0).all(), "a filtered-out token was sampled"
    assert _chi_square_p_value(counts, expected) > 1e-3


def test_chi_square_rejects_a_wrong_distribution():
    # The test above can fail: temperature-1 samples are rejected against the temperature-0.8 distribution.
    assert _chi_square_p_value(_draw(temperature=1.0), _reference_probs(temperature=0.8)) < 1e-6


def test_filters_keep_exactly_the_reference_support():
    for options in (dict(top_k=1), dict(top_p=0.01), dict(top_p=0.5), dict(min_p=0.9), dict(min_p=0.3, top_k=4)):
        ours = torch.isfinite(filter_logits(LOGITS[None], **options))[0]
        assert torch.equal(ours, _reference_probs(**options) > 0), options


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(4, 50)
    draw = lambda seed: sample_from_logits(logits.repeat(64, 1), torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_greedy_is_argmax():
    logits = torch.randn(5, 30)
    assert torch.equal(next_tokens(logits, GenerationConfig(), None, None), logits.argmax(-1))


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(2, 20)
    prompt = torch.tensor([[0, 0, 3, 5, 5], [1, 2, 3, 4, 19]])  # row 0 left-padded with two pads
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    counts = TokenCounts(prompt, mask, 20)
    counts.add(torch.tensor([7, 7]))
    ours = apply_penalties(logits, counts, GenerationConfig(repetition_penalty=1.3))
    seen = [[3, 5, 7], [1, 2, 3, 4, 19, 7]]  # prompt (pads excluded) + generated
    for row in range(2):
        ids = torch.tensor([seen[row]])
        expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits[row:row + 1].clone())
        assert torch.allclose(ours[row], expected[0])


def test_presence_and_frequency_penalties_by_hand():
    logits = torch.zeros(1, 6)
    counts = TokenCounts(torch.tensor([[4]]), torch.tensor([[1]]), 6)
    for token in (1, 1, 1, 2):
        counts.add(torch.tensor([token]))
    out = apply_penalties(logits, counts, GenerationConfig(presence_penalty=0.5, frequency_penalty=0.25))
    # token 1: 0.5 + 3 * 0.25; token 2: 0.5 + 0.25; the prompt's token 4 is not counted (OpenAI semantics)
    assert out[0].tolist() == pytest.approx([0.0, -1.25, -0.75, 0.0, 0.0, 0.0])
