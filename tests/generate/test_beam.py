"""Beam search with stop strings (against transformers' beam search with stop_strings), log-probabilities of
the returned beams (against a full forward) and their finish reasons."""

from __future__ import annotations

import pytest
import torch

import lmstack
from lmstack.config import ModelConfig

PROMPT = [5, 17, 200, 3, 9, 44, 71]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    config = ModelConfig(vocab_size=300, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                         intermediate_size=128, max_seq_len=96, init_std=0.2)  # large init: varied output
    return lmstack.Transformer(config).eval()


def test_beam_stop_strings_equal_transformers(bos_llama):
    reference, hf_tok, model, tok = bos_llama
    prompt = hf_tok("The quick brown fox")["input_ids"]
    options = dict(num_beams=4, num_return_sequences=4, max_new_tokens=12)
    free = lmstack.generate(model, tok, [prompt], **options)
    text = free.texts[0]
    # Two printable ASCII characters the best beam reaches in its second half, so that beams ending there
    # compete with the full-length ones (the random model also writes bytes that are not UTF-8 on their own;
    # a stop string made of those would be matched on U+FFFD).
    start = next(i for i in range(len(text) // 2, len(text) - 1) if text[i:i + 2].isascii()
                 and text[i:i + 2].isprintable() and " " not in text[i:i + 2])
    stop = text[start:start + 2]
    ours = lmstack.generate(model, tok, [prompt], stop=[stop], **options)
    with torch.no_grad():
        hf = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                do_sample=False, stop_strings=[stop], tokenizer=hf_tok,
                                pad_token_id=hf_tok.pad_token_id, output_scores=True, return_dict_in_generate=True,
                                **options)
    assert any(b.finish_reason == "stop" for b in ours.beams[0])
    for beam, hf_seq, hf_score in zip(ours.beams[0], hf.sequences, hf.sequences_scores):
        new = hf_seq[len(prompt):].tolist()
        assert beam.token_ids == new[:len(beam.token_ids)]
        assert all(t == hf_tok.pad_token_id for t in new[len(beam.token_ids):])  # transformers pads after the end
        assert beam.score == pytest.approx(hf_score.item(), abs=1e-4)
        full_text = tok.decode(beam.token_ids, skip_special_tokens=True)
        if beam.finish_reason == "stop":
            assert beam.text == full_text[:full_text.index(stop)] and stop not in beam.text
        else:
            assert beam.text == full_text and stop not in full_text
    assert ours.texts[0] == ours.beams[0][0].text and ours.finish_reasons[0] == ours.beams[0][0].finish_reason


def test_beam_logprobs_equal_a_full_forward(model):
    out = lmstack.generate(model, None, [PROMPT], num_beams=3, num_return_sequences=3, max_new_tokens=8,
                           logprobs=True, top_logprobs=2, repetition_penalty=1.3)  # logprobs: raw, before penalties
    P = len(PROMPT)
    for beam in out.beams[0]:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([PROMPT + beam.token_ids]))[0], dim=-1)  # (T, V)
        assert len(beam.logprobs) == len(beam.top_logprobs) == len(beam.token_ids)
        for step, token in enumerate(beam.token_ids):
            assert beam.logprobs[step] == pytest.approx(logp[P - 1 + step, token].item(), abs=1e-4)
            top = torch.topk(logp[P - 1 + step], 2)
            assert list(beam.top_logprobs[step]) == top.indices.tolist()
            assert list(beam.top_logprobs[step].values()) == pytest.approx(top.values.tolist(), abs=1e-4)
    assert out.logprobs[0] == out.beams[0][0].logprobs and out.top_logprobs[0] == out.beams[0][0].top_logprobs


def test_beam_finish_reasons(model):
    options = dict(num_beams=3, num_return_sequences=3, max_new_tokens=8)
    free = lmstack.generate(model, None, [PROMPT], ignore_eos=True, **options)
    assert all(b.finish_reason == "length" and len(b.token_ids) == 8 for b in free.beams[0])
    eos = free.token_ids[0][2]  # the best beam's third token ends it
    out = lmstack.generate(model, None, [PROMPT], eos_token_ids=[eos], **options)
    for beam in out.beams[0]:
        assert beam.finish_reason == ("eos" if beam.token_ids[-1] == eos else "length")
        assert eos not in beam.token_ids[:-1]
    assert "eos" in out.finish_reasons + [b.finish_reason for b in out.beams[0]]
