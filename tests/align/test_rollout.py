"""The rollout sampler (lmstack.train.rollout.sample_groups): each prompt prefilled once and fanned out to
its G rows of one decode session must give exactly the samples `lmstack.generate` gives for the P·G
repeated prompts with the same seed: same selection code, same random stream, same logits."""

from __future__ import annotations

import pytest
import torch

import lmstack
from lmstack.generate import generate
from lmstack.train.rollout import RolloutConfig, sample_groups


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = lmstack.ModelConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                 max_seq_len=16, tie_word_embeddings=True, eos_token_id=1, pad_token_id=0)
    return lmstack.Transformer(config).eval()


@pytest.mark.parametrize("options", [{}, {"top_k": 5}, {"top_p": 0.7, "temperature": 0.8}])
def test_fanned_out_groups_sample_what_generate_samples(tiny_model, options):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [15]]  # uneven lengths: rows at different positions
    G, N = 3, 6
    cfg = RolloutConfig(prompts_per_rollout=len(prompts), max_new_tokens=N, **options)
    eos = list(range(1, 9))  # a fifth of the vocabulary: some rows end early, some run to N
    ours = sample_groups(tiny_model, prompts, G, cfg, seed=11, eos_ids=eos)
    peer = generate(tiny_model, None, [p for p in prompts for _ in range(G)], max_new_tokens=N, seed=11,
                    eos_token_ids=eos, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    assert ours == peer.token_ids
    assert any(len(c) < N for c in ours) and any(len(c) == N for c in ours)  # both ways of finishing happen
    assert all(c[-1] in eos for c in ours if len(c) < N)  # an early end is an EOS, and it is kept


def test_a_row_stops_when_its_cache_row_is_full(tiny_model):
    # the model's context is 16: a 13-token prompt has room for 3 tokens whatever max_new_tokens says
    prompts = [list(range(3, 16)), [5, 6]]
    cfg = RolloutConfig(prompts_per_rollout=2, max_new_tokens=8)
    ours = sample_groups(tiny_model, prompts, 2, cfg, seed=3, eos_ids=[])
    assert [len(c) for c in ours[:2]] == [3, 3] and [len(c) for c in ours[2:]] == [8, 8]
    peer = generate(tiny_model, None, [p for p in prompts for _ in range(2)], max_new_tokens=8, seed=3,
                    temperature=1.0, ignore_eos=True)
    assert ours == peer.token_ids
