"""Greedy decoding and beam search against transformers' generate on tiny random llama / qwen2 / gpt2 models."""

from __future__ import annotations

import pytest
import torch

import lmstack
from tests.parity.hf_models import build_hf_model

FAMILIES = ["llama", "qwen2", "gpt2"]
VOCAB = 211


@pytest.fixture(scope="module", params=FAMILIES)
def models(request, tmp_path_factory):
    """(transformers model, the same weights loaded by lmstack) for each family."""
    directory = tmp_path_factory.mktemp(request.param)
    reference = build_hf_model(request.param, directory)
    return reference, lmstack.load_model(directory).eval()


def _hf_new_tokens(reference, prompt: list[int], **kwargs) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def _strip_after_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1]
    return ids


def test_greedy_equals_transformers(models):
    reference, model = models
    eos = set(model.config.eos_token_ids)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 12, 1)]
    ours = lmstack.generate(model, None, prompts, max_new_tokens=24)  # one left-padded batch
    for prompt, got, reason in zip(prompts, ours.token_ids, ours.finish_reasons):
        expected = _strip_after_eos(_hf_new_tokens(reference, prompt, max_new_tokens=24, do_sample=False), eos)
        assert got == expected
        assert reason == ("eos" if got[-1] in eos else "length")


def test_beam_search_equals_transformers(models):
    reference, model = models
    prompt = torch.randint(0, VOCAB, (7,)).tolist()
    greedy = lmstack.generate(model, None, [prompt], max_new_tokens=6, ignore_eos=True).token_ids[0]
    # EOS ids the beams actually produce, so that hypotheses finish early and the stopping rules matter.
    cases = ((0.6, False, [greedy[3]]), (1.5, True, [greedy[2], greedy[4]]), (1.0, "never", [greedy[1]]),
             (0.0, False, model.config.eos_token_ids))
    for length_penalty, early_stopping, eos_ids in cases:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            hf = reference.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, do_sample=False,
                                    num_beams=4, num_return_sequences=4, length_penalty=length_penalty,
                                    early_stopping=early_stopping, max_new_tokens=12, eos_token_id=eos_ids or None,
                                    output_scores=True, return_dict_in_generate=True)
        ours = lmstack.generate(model, None, [prompt], num_beams=4, num_return_sequences=4, max_new_tokens=12,
                                length_penalty=length_penalty, early_stopping=early_stopping, eos_token_ids=eos_ids)
        eos = set(eos_ids)
        expected_best = _strip_after_eos(hf.sequences[0, len(prompt):].tolist(), eos)
        assert ours.token_ids[0] == expected_best
        for beam, hf_seq, hf_score in zip(ours.beams[0], hf.sequences, hf.sequences_scores):
            assert beam.token_ids == _strip_after_eos(hf_seq[len(prompt):].tolist(), eos)
            assert beam.score == pytest.approx(hf_score.item(), abs=1e-4)
