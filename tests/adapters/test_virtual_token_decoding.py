"""Decoding with virtual tokens (prompt tuning, P-tuning, prefix tuning) beyond greedy: beam search against a
reference beam search over peft's model, rows that join a running continuous batch, and the compiled decode step."""

from __future__ import annotations

import pytest
import torch

from lmstack.adapters import save_adapter
from lmstack.generate import ContinuousBatch, GenerationConfig, generate
from tests.adapters.conftest import peft, transformers
from tests.adapters.test_prompt_methods import _ours

pytestmark = pytest.mark.filterwarnings("ignore")  # peft's notes on prompt learning and position ids
PROMPTS = [[3, 17, 29, 41, 7], [11, 2], [5, 9, 100, 4]]


def reference_beam_search(model, prompt: list[int], beams: int, steps: int) -> list[tuple[list[int], float]]:
    """Beam search without end tokens over uncached full forwards: every step keeps the `beams` best of all
    (beam, next token) extensions by summed log-probability (as transformers' beam search does before any
    beam ends)."""
    alive = [([], 0.0)]
    for _ in range(steps):
        candidates = []
        for tokens, score in alive:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, -1]
            logp = torch.log_softmax(logits.float(), -1)
            top = torch.topk(logp, beams)
            candidates += [(tokens + [int(t)], score + float(v)) for v, t in zip(top.values, top.indices)]
        alive = sorted(candidates, key=lambda c: -c[1])[:beams]
    return alive


@pytest.mark.parametrize("method", ["prompt", "p_tuning", "prefix"])
def test_beam_search_equals_a_reference_beam_search_over_pefts_model(hf_base, tmp_path, method):
    """The reference runs on peft's model (transformers + the adapter lmstack saved), by full forwards.
    (peft's own `generate` is no reference here: with prompt tuning on transformers 5 its greedy output
    already leaves its own full-forward argmax after the first token.)"""
    directory, _ = hf_base("llama")
    ours = _ours(directory, method)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(directory))
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(directory),
                                            tmp_path / "adapter").eval()
    steps = 6
    got = generate(ours, None, [PROMPTS[0]], ignore_eos=True, num_beams=3, num_return_sequences=3,
                   max_new_tokens=steps, length_penalty=0.0)
    expected = reference_beam_search(theirs, PROMPTS[0], 3, steps)
    for beam, (tokens, score) in zip(got.beams[0], expected):
        assert beam.token_ids == tokens
        assert beam.score == pytest.approx(score, abs=1e-4)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_rows_joining_a_running_batch_get_their_tokens_alone(hf_base, method):
    directory, _ = hf_base("llama")
    model = _ours(directory, method)
    configs = [GenerationConfig(max_new_tokens=9, ignore_eos=True),
               GenerationConfig(max_new_tokens=4, ignore_eos=True, logprobs=True),
               GenerationConfig(max_new_tokens=6, ignore_eos=True, temperature=1.0, seed=5)]
    alone = [generate(model, None, [p], config=c) for p, c in zip(PROMPTS, configs)]
    results = {}
    with ContinuousBatch(model, None, rows=2, cache_len=32) as batch:
        rows = {0: batch.add(PROMPTS[0], configs[0]), 1: batch.add(PROMPTS[1], configs[1])}
        while batch.has_running() or len(results) < 3:
            batch.step()
            for request, row in list(rows.items()):
                if batch.sequence(row).finished:
                    results[request] = batch.sequence(row)
                    batch.release(row)
                    del rows[request]
                    if 2 not in results and 2 not in rows:
                        rows[2] = batch.add(PROMPTS[2], configs[2])  # joins a batch that is mid-decode
    for request, expected in enumerate(alone):
        assert results[request].ids == expected.token_ids[0], request
    assert results[1].logprobs == pytest.approx(alone[1].logprobs[0], abs=1e-4)


@pytest.mark.slow  # inductor compiles a decode graph: ~1 min on 2 cores
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_compiled_decoding_equals_eager(hf_base, method):
    directory, _ = hf_base("llama")
    model = _ours(directory, method)
    eager = generate(model, None, PROMPTS, max_new_tokens=8, ignore_eos=True, logprobs=True)
    compiled = generate(model, None, PROMPTS, max_new_tokens=8, ignore_eos=True, logprobs=True, compile=True)
    assert compiled.token_ids == eager.token_ids
    for got, want in zip(compiled.logprobs, eager.logprobs):
        assert got == pytest.approx(want, abs=1e-4)
