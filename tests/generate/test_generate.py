"""Generation behaviour: batching, per-row finishing, logprobs, stop strings, streaming, speculative decoding,
bad input."""

from __future__ import annotations

import pytest
import torch

import lmstack
from lmstack.config import ModelConfig
from lmstack.generate import generate, stream


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    config = ModelConfig(vocab_size=300, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                         intermediate_size=128, max_seq_len=96, init_std=0.2)  # large init: varied greedy output
    return lmstack.Transformer(config).eval()


PROMPTS = [[5, 17, 200, 3, 9, 44, 71], [8], [120, 6, 6, 250]]


def test_public_function_is_callable_from_the_package():
    model = lmstack.load_model("llama-tiny").eval()
    out = lmstack.generate(model, None, [[1, 2, 3]], max_new_tokens=5)
    assert len(out.token_ids[0]) == 5 and out.texts is None


def test_batched_equals_each_alone(model):
    batched = generate(model, None, PROMPTS, max_new_tokens=20, logprobs=True)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, None, [prompt], max_new_tokens=20, logprobs=True)
        assert batched.token_ids[row] == alone.token_ids[0]
        assert batched.logprobs[row] == pytest.approx(alone.logprobs[0], abs=1e-4)


def test_beam_search_batched_equals_each_alone(model):
    options = dict(num_beams=3, num_return_sequences=2, length_penalty=0.7, max_new_tokens=10, repetition_penalty=1.3)
    batched = generate(model, None, PROMPTS, **options)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, None, [prompt], **options)
        assert [b.token_ids for b in batched.beams[row]] == [b.token_ids for b in alone.beams[0]]
        assert [b.score for b in batched.beams[row]] == pytest.approx([b.score for b in alone.beams[0]], abs=1e-4)


def test_each_row_finishes_on_its_own(model):
    free = generate(model, None, PROMPTS, max_new_tokens=20)
    eos = free.token_ids[0][3]  # row 0 emits this at step 3; it ends row 0 there
    out = generate(model, None, PROMPTS, max_new_tokens=20, eos_token_ids=[eos])
    for row in range(len(PROMPTS)):
        expected = free.token_ids[row]
        if eos in expected:
            expected = expected[:expected.index(eos) + 1]
        assert out.token_ids[row] == expected
        assert out.finish_reasons[row] == ("eos" if expected[-1] == eos else "length")
    assert out.finish_reasons[0] == "eos" and len(out.token_ids[0]) <= 4


def test_logprobs_equal_a_full_forward(model):
    out = generate(model, None, [PROMPTS[0]], max_new_tokens=8, logprobs=True, top_logprobs=3)
    ids = torch.tensor([PROMPTS[0] + out.token_ids[0]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0], dim=-1)  # (T, V)
    P = len(PROMPTS[0])
    for step, token in enumerate(out.token_ids[0]):
        assert out.logprobs[0][step] == pytest.approx(logp[P - 1 + step, token].item(), abs=1e-4)
        top = torch.topk(logp[P - 1 + step], 3)
        assert list(out.top_logprobs[0][step]) == top.indices.tolist()


def test_sampling_is_seeded(model):
    a = generate(model, None, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=11)
    b = generate(model, None, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=11)
    c = generate(model, None, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=12)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_context_limit_cuts_generation(model):
    out = generate(model, None, [list(range(90))], max_new_tokens=20)  # context 96
    assert len(out.token_ids[0]) == 6 and out.finish_reasons[0] == "length"


@pytest.mark.parametrize("options, message", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences must be between 1 and num_beams"),
    (dict(tempreature=0.5), "unknown key tempreature"),
])
def test_bad_options_give_one_clear_error(model, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        generate(model, None, [[1, 2]], **options)


def test_bad_prompts_give_one_clear_error(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, None, [[1, 2], []])
    with pytest.raises(ValueError, match="prompt 0 has 100 tokens but the model's context is 96 tokens"):
        generate(model, None, [list(range(100))], max_new_tokens=4)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, None, [[1, 300]])
    with pytest.raises(ValueError, match="no tokenizer"):
        generate(model, None, ["text"])
    truncated = generate(model, None, [list(range(100))], max_new_tokens=4, truncate_prompt=True)
    alone = generate(model, None, [list(range(100))[-92:]], max_new_tokens=4)  # keeps context - max_new tokens
    assert truncated.token_ids == alone.token_ids


def test_stop_strings_cut_the_text_and_streaming_matches(tiny):
    model, tokenizer = tiny
    prompt = "The quick brown"
    full = generate(model, tokenizer, prompt, max_new_tokens=30, ignore_eos=True)
    text = full.texts[0]
    assert text == "".join(stream(model, tokenizer, prompt, max_new_tokens=30, ignore_eos=True))
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = generate(model, tokenizer, prompt, max_new_tokens=30, ignore_eos=True, stop=[stop])
    assert cut.texts[0] == text[:text.index(stop)]
    assert cut.finish_reasons[0] == "stop"
    pieces = list(stream(model, tokenizer, prompt, max_new_tokens=30, ignore_eos=True, stop=[stop]))
    assert "".join(pieces) == cut.texts[0]
    assert full.token_ids[0][:len(cut.token_ids[0])] == cut.token_ids[0]


def test_speculative_decoding_equals_target_greedy(model):
    draft_small = lmstack.Transformer(model.config.replace(num_layers=1, hidden_size=32, num_heads=2,
                                                           num_kv_heads=1)).eval()
    # A layer-skipping draft: the target's first layer, its final norm and head.
    draft_skip = lmstack.Transformer(model.config.replace(num_layers=1)).eval()
    draft_skip.load_state_dict({k: v for k, v in model.state_dict().items()
                                if not k.startswith("model.layers.") or k.startswith("model.layers.0.")})
    expected = generate(model, None, PROMPTS, max_new_tokens=25)
    for draft in (draft_small, draft_skip):
        for k in (1, 4):
            out = generate(model, None, PROMPTS, max_new_tokens=25, draft_model=draft, num_draft_tokens=k)
            assert out.token_ids == expected.token_ids
            assert 0.0 <= out.stats.acceptance_rate <= 1.0
    same = generate(model, None, PROMPTS, max_new_tokens=25, draft_model=model, num_draft_tokens=4)
    assert same.token_ids == expected.token_ids and same.stats.acceptance_rate == 1.0
    with pytest.raises(ValueError, match="greedy"):
        generate(model, None, PROMPTS, draft_model=draft_small, temperature=0.7)
