"""The decode session and the continuous batch a scheduler drives: rows at their own cache slots, requests
that join a running batch and leave it, each with its own settings and seed."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import lmstack
from lmstack.config import ModelConfig
from lmstack.errors import GenerationError
from lmstack.generate import ContinuousBatch, DecodeSession, GenerationConfig, generate

VARIANTS = {
    "llama": dict(num_kv_heads=2),
    "mistral-window": dict(num_kv_heads=2, sliding_window=5),
    "gpt2-like": dict(mlp_kind="gelu_tanh", norm_kind="layernorm", norm_bias=True, position_kind="learned",
                      qkv_bias=True, out_bias=True, mlp_bias=True),
}
PROMPTS = [[5, 17, 200, 3, 9, 44, 71], [8], [120, 6, 6, 250], [77, 13]]


def tiny_model(seed: int = 3, **fields) -> lmstack.Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=300, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128,
                         max_seq_len=96, init_std=0.2, **{"num_kv_heads": 2, **fields})  # large init: varied output
    return lmstack.Transformer(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_at_their_own_slots_equal_each_rows_full_forward(variant):
    """Prompts of 7, 2 and 4 tokens, then decode steps and a 3-token score with every row at its own slots:
    each row's logits equal a plain (cache-free) forward of that row's sequence alone."""
    model = tiny_model(**VARIANTS[variant])
    torch.manual_seed(0)
    sequences = [torch.randint(0, 300, (16,)).tolist() for _ in range(3)]
    prompt_lens = [7, 2, 4]
    got: list[list[torch.Tensor]] = [[] for _ in sequences]
    with DecodeSession(model, rows=3, cache_len=24) as session:
        first = session.prefill([s[:n] for s, n in zip(sequences, prompt_lens)], [0, 1, 2])  # (3, V)
        for row in range(3):
            got[row].append(first[row])
        for step in range(4):
            tokens = torch.tensor([s[n + step] for s, n in zip(sequences, prompt_lens)])
            logits = session.decode(tokens)  # (3, V)
            for row in range(3):
                got[row].append(logits[row])
        window = torch.tensor([s[n + 4:n + 7] for s, n in zip(sequences, prompt_lens)])  # (3, 3)
        scored = session.score(window)  # (3, 3, V)
        assert session.lengths.tolist() == [n + 4 for n in prompt_lens]  # score leaves the lengths alone
    for row, (sequence, n) in enumerate(zip(sequences, prompt_lens)):
        with torch.no_grad():
            full = model(torch.tensor([sequence]))[0]  # (16, V)
        expected = full[n - 1:n + 7]  # the logits after the prompt's last token, each decoded and scored token
        assert torch.allclose(torch.stack(got[row] + list(scored[row])), expected, atol=1e-4), row


def test_a_request_joining_a_running_batch_gets_its_tokens_alone(model):
    """Rows 0 and 1 run; a request joins at step 5; a released row (stale keys past the new prompt) takes the
    next request. Every request gets exactly the tokens it gets alone: greedy, or sampled with its own seed,
    with its logprobs."""
    configs = [GenerationConfig(max_new_tokens=20), GenerationConfig(max_new_tokens=6, logprobs=True),
               GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=50, seed=7),
               GenerationConfig(max_new_tokens=10, repetition_penalty=1.3)]
    alone = [generate(model, None, [p], config=c) for p, c in zip(PROMPTS, configs)]
    results = {}
    with ContinuousBatch(model, None, rows=3, cache_len=40) as batch:
        rows = {0: batch.add(PROMPTS[0], configs[0]), 1: batch.add(PROMPTS[1], configs[1])}
        for step in range(12):
            if step == 5:
                rows[2] = batch.add(PROMPTS[2], configs[2])  # joins while 0 and 1 run
            batch.step()
            for request, row in list(rows.items()):
                if row is not None and batch.sequence(row).finished:
                    results[request] = batch.sequence(row)
                    batch.release(row)
                    rows[request] = None
            if step == 6:
                assert 1 in results  # request 1 (6 tokens) is done and its row free again
                rows[3] = batch.add(PROMPTS[3], configs[3])
                assert rows[3] == 1  # the released row is reused
        while batch.has_running():
            batch.step()
        for request, row in rows.items():
            if row is not None:
                results[request] = batch.sequence(row)
    for request, expected in enumerate(alone):
        assert results[request].ids == expected.token_ids[0], request
        assert results[request].finish_reason == expected.finish_reasons[0]
    assert results[1].logprobs == pytest.approx(alone[1].logprobs[0], abs=1e-4)


def test_joining_is_checked(model):
    with ContinuousBatch(model, None, rows=1, cache_len=16) as batch:
        with pytest.raises(GenerationError, match="16 tokens but a row holds 16"):
            batch.add(list(range(16)), GenerationConfig())
        row = batch.add([1, 2], GenerationConfig(max_new_tokens=30))
        with pytest.raises(GenerationError, match="1 prompts but 0 free rows of 1"):
            batch.add([3], GenerationConfig())
        while batch.has_running():
            batch.step()
        assert len(batch.sequence(row).ids) == 14 and batch.sequence(row).finish_reason == "length"  # the row is full
        batch.release(row)
        with pytest.raises(GenerationError, match="row 0 holds no request"):
            batch.sequence(row)


@pytest.mark.slow
def test_compiled_continuous_batch_compiles_once_for_every_join_and_release(model):
    config = GenerationConfig(max_new_tokens=8)
    alone = [generate(model, None, [p], config=config).token_ids[0] for p in PROMPTS]
    with ContinuousBatch(model, None, rows=2, cache_len=64, compile=True) as batch:
        got, waiting = {}, list(range(len(PROMPTS)))
        rows: dict[int, int] = {}
        graphs = None
        while waiting or rows:
            while waiting and batch.free_rows:
                request = waiting.pop(0)
                rows[request] = batch.add(PROMPTS[request], config)
            batch.step()
            if graphs is None and batch.decode_steps:
                graphs = counters["stats"]["unique_graphs"]  # after the first compiled decode step
            for request, row in list(rows.items()):
                if batch.sequence(row).finished:
                    got[request] = batch.sequence(row).ids
                    batch.release(row)
                    del rows[request]
        assert counters["stats"]["unique_graphs"] == graphs  # joins and releases reuse the one graph
    assert [got[i] for i in range(len(PROMPTS))] == alone


class BiasedHead(torch.nn.Module):
    """A model that is not a Transformer but provides the CausalLM protocol: it wraps one and adds a fixed bias
    to its logits (as a value-head or adapted model brings its own head). Generation must call its `head`."""

    def __init__(self, inner: lmstack.Transformer):
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.register_buffer("bias", torch.randn(inner.config.vocab_size, generator=torch.Generator().manual_seed(1)))

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache_slots=None, targets=None,
                ignore_index=-100):
        return self.head(self.hidden_states(input_ids, attention_mask, position_ids, cache_slots))

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache_slots=None):
        return self.inner.hidden_states(input_ids, attention_mask, position_ids, cache_slots)

    def head(self, hidden):
        return self.inner.head(hidden) + 2.0 * self.bias

    def make_cache(self, batch_size, max_len, dtype=None, device=None):
        return self.inner.make_cache(batch_size, max_len, dtype, device)

    def kv_caches(self):
        return self.inner.kv_caches()

    def use_caches(self, caches):
        self.inner.use_caches(caches)


def test_any_causal_lm_decodes_through_its_own_head(model):
    wrapped = BiasedHead(model).eval()
    assert isinstance(wrapped, lmstack.model.protocol.CausalLM) and not isinstance(wrapped, lmstack.Transformer)
    out = generate(wrapped, None, PROMPTS[:2], max_new_tokens=8)
    for prompt, got in zip(PROMPTS, out.token_ids):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(8):  # the reference: greedy by full forwards of the wrapper, no cache
                ids.append(int(wrapped(torch.tensor([ids]))[0, -1].argmax()))
        assert got == ids[len(prompt):]
    assert out.token_ids != generate(model, None, PROMPTS[:2], max_new_tokens=8).token_ids  # the head mattered
    beam = generate(wrapped, None, PROMPTS[:1], num_beams=2, max_new_tokens=8, ignore_eos=True).beams[0][0]
    with torch.no_grad():  # its score is the wrapper's mean log-prob of its tokens
        logp = torch.log_softmax(wrapped(torch.tensor([PROMPTS[0] + beam.token_ids]))[0], dim=-1)
    P = len(PROMPTS[0])
    expected = sum(logp[P - 1 + i, t].item() for i, t in enumerate(beam.token_ids)) / len(beam.token_ids)
    assert beam.score == pytest.approx(expected, abs=1e-4)
    speculative = generate(wrapped, None, PROMPTS[:2], max_new_tokens=8, draft_model=wrapped)
    assert speculative.token_ids == out.token_ids
