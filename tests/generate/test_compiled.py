"""Compiled generation: on CPU the weights are frozen into the graph (lmstack.generate.compiled), so these
check that it still follows the model it is given: same output as eager, after the weights change, for a
second model, and without recompiling between calls of the same shape."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import lmstack
from lmstack.config import ModelConfig
from lmstack.generate import generate
from lmstack.generate.compiled import release, weights_fingerprint
from lmstack.generate.session import cache_length

PROMPTS = [[5, 17, 200, 3, 9, 44, 71], [8], [120, 6, 6, 250]]


def tiny_model(seed: int) -> lmstack.Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=128, max_seq_len=96, init_std=0.2)  # large init: varied greedy output
    return lmstack.Transformer(config).eval()


def sgd_step(model: lmstack.Transformer) -> None:
    """One real optimizer step, as a training loop between two generations would take."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.tensor([PROMPTS[0]])
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)


def test_fingerprint_changes_with_the_weights_and_only_then():
    model = tiny_model(0)
    before = weights_fingerprint(model)
    generate(model, None, PROMPTS, max_new_tokens=3)
    assert weights_fingerprint(model) == before  # generation reads the weights, never writes them
    sgd_step(model)
    after_step = weights_fingerprint(model)
    assert after_step != before
    model.load_state_dict(tiny_model(1).state_dict())
    assert weights_fingerprint(model) != after_step


def assert_same(compiled, eager):
    assert compiled.token_ids == eager.token_ids
    for got, want in zip(compiled.logprobs, eager.logprobs):
        assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.slow
def test_compiled_follows_weight_updates_and_other_models():
    first, second = tiny_model(0), tiny_model(1)
    options = dict(max_new_tokens=12, logprobs=True)
    eager_before = generate(first, None, PROMPTS, **options)
    assert_same(generate(first, None, PROMPTS, compile=True, **options), eager_before)
    sgd_step(first)  # the frozen graph holds the old weights: it must not be used again
    assert_same(generate(first, None, PROMPTS, compile=True, **options), generate(first, None, PROMPTS, **options))
    compiled_second = generate(second, None, PROMPTS, compile=True, **options)
    assert_same(compiled_second, generate(second, None, PROMPTS, **options))
    assert_same(generate(first, None, PROMPTS, compile=True, **options), generate(first, None, PROMPTS, **options))


@pytest.mark.slow
def test_compiled_reuses_its_graph_between_calls():
    model = tiny_model(2)
    generate(model, None, PROMPTS, max_new_tokens=8, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    for prompt in (PROMPTS, [[1, 2, 3], [4], [5, 6]]):  # same batch size and cache bucket: same graph
        generate(model, None, prompt, max_new_tokens=8, compile=True)
        generate(model, None, prompt, max_new_tokens=8)  # an eager call in between leaves the cache alone
    assert counters["stats"]["unique_graphs"] == graphs
    release(model)  # frees the kept graph and cache: the next compiled call compiles again
    generate(model, None, PROMPTS, max_new_tokens=8, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs + 1


@pytest.mark.slow
def test_compiled_beam_search_and_speculative_match_eager():
    model, draft = tiny_model(3), tiny_model(4)
    beam = dict(num_beams=3, num_return_sequences=2, length_penalty=0.7, max_new_tokens=8)
    eager, compiled = generate(model, None, PROMPTS, **beam), generate(model, None, PROMPTS, compile=True, **beam)
    for got, want in zip(compiled.beams, eager.beams):
        assert [b.token_ids for b in got] == [b.token_ids for b in want]
        assert [b.score for b in got] == pytest.approx([b.score for b in want], abs=1e-4)
    greedy = generate(model, None, PROMPTS, max_new_tokens=10)
    speculative = generate(model, None, PROMPTS, max_new_tokens=10, draft_model=draft, compile=True)
    assert speculative.token_ids == greedy.token_ids


def test_compiled_cache_lengths_are_few_powers_of_two():
    assert cache_length(7, 8, 96, compile=False) == 15  # eager: exactly what is needed
    assert cache_length(7, 8, 96, compile=True) == 64
    assert cache_length(32, 64, 1024, compile=True) == 128
    assert cache_length(600, 10, 1024, compile=True) == 1024
    assert cache_length(90, 10, 96, compile=True) == 96  # never beyond the context
    # a chat whose prompt grows turn by turn up to a 2048 context touches at most 6 lengths
    assert len({cache_length(p, 256, 2048, compile=True) for p in range(1, 1793)}) <= 6


@pytest.mark.slow
def test_compiled_gpt2_style_model_matches_eager():
    """Biases, LayerNorm, GELU and learned positions through the frozen C++ GEMM path."""
    torch.manual_seed(5)
    config = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                         mlp_kind="gelu_tanh", norm_kind="layernorm", norm_bias=True, position_kind="learned",
                         qkv_bias=True, out_bias=True, mlp_bias=True, max_seq_len=96, init_std=0.2)
    model = lmstack.Transformer(config).eval()
    options = dict(max_new_tokens=12, logprobs=True)
    assert_same(generate(model, None, PROMPTS, compile=True, **options), generate(model, None, PROMPTS, **options))
