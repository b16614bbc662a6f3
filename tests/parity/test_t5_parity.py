"""The T5-style encoder-decoder against transformers' T5ForConditionalGeneration on tiny random configs:
logits (padded batches), the summed loss with labels, both directions of conversion, greedy and beam generation."""

from __future__ import annotations

import json

import pytest
import torch

import lmstack
from lmstack.model.seq2seq import Seq2Seq

TOL = 1e-4
VARIANTS = {  # T5 1.0 (ReLU, tied, scaled output) and 1.1 / Flan (gated GELU, separate head)
    "t5-1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "t5-1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def build_hf_t5(directory, **overrides):
    import transformers

    torch.manual_seed(1234)
    config = transformers.T5Config(**{**dict(vocab_size=211, d_model=64, d_kv=16, d_ff=96, num_layers=2,
                                             num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=8,
                                             relative_attention_max_distance=20, dropout_rate=0.0,
                                             decoder_start_token_id=0, eos_token_id=1, pad_token_id=0),
                                      **overrides})
    model = transformers.T5ForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if not overrides.get("tie_word_embeddings", True):  # transformers 5 ties even then: give it its own head (T5 1.1)
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.3)
    model.eval().save_pretrained(directory)
    return model


def _padded(lengths, low=2):
    T = max(lengths)
    ids = torch.randint(low, 211, (len(lengths), T))
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids * mask, mask


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_t5_logits_and_loss_match_transformers_both_ways(variant, tmp_path):
    import transformers

    reference = build_hf_t5(tmp_path / "hf", **VARIANTS[variant])
    model = lmstack.load_model(tmp_path / "hf").eval()
    assert isinstance(model, Seq2Seq)
    assert model.config.tie_word_embeddings == (variant == "t5-1.0")
    assert model.config.scale_decoder_outputs == (variant == "t5-1.0")
    lmstack.save_model(model, tmp_path / "out")
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids, mask = _padded((30, 17, 4))  # 30 > max_distance 20: the log-spaced buckets are used
    labels, label_mask = _padded((25, 9, 3))
    labels = labels.masked_fill(label_mask == 0, -100)
    with torch.no_grad():
        decoder_ids = model.shift_right(labels)
        got = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids)
        loss = model(ids, attention_mask=mask, targets=labels)
        for other in (reference, reloaded):
            out = other(input_ids=ids, attention_mask=mask, labels=labels)
            assert (got - out.logits).abs().max().item() <= TOL
            assert (loss / (labels != -100).sum()).item() == pytest.approx(out.loss.item(), abs=1e-5)


def test_tied_head_without_scaling_survives_a_round_trip(tmp_path):
    """transformers 5's T5Config(tie_word_embeddings=False) ties the head but does not scale: written untied."""
    import transformers

    reference = build_hf_t5(tmp_path / "hf", feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    with torch.no_grad():
        reference.lm_head.weight = reference.shared.weight  # what transformers 5 builds: tied, unscaled
    reference.save_pretrained(tmp_path / "hf")
    model = lmstack.load_model(tmp_path / "hf").eval()
    assert model.config.tie_word_embeddings and not model.config.scale_decoder_outputs
    lmstack.save_model(model, tmp_path / "out")
    written = json.loads((tmp_path / "out/config.json").read_text())
    assert written["tie_word_embeddings"] is False and written["scale_decoder_outputs"] is False
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids, mask = _padded((9, 5))
    decoder_ids = torch.randint(0, 211, (2, 6))
    with torch.no_grad():
        got = model(ids, mask, decoder_ids)
        for other in (reference, reloaded):
            assert (got - other(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
                    ).abs().max().item() <= TOL
    assert lmstack.load_model(tmp_path / "out").config == model.config


def _hf_new_tokens(sequences: torch.Tensor, eos: int = 1) -> list[list[int]]:
    """transformers' generate output (start token first, padded after eos) -> the new ids up to eos."""
    rows = []
    for row in sequences[:, 1:].tolist():
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_t5_greedy_and_beam_generation_equal_transformers(variant, tmp_path):
    """lmstack.generate drives T5 through the decode session: greedy ids (and their logprobs) and beam
    sequences and scores equal transformers' generate on a padded batch of prompts."""
    # (transformers 5's generate sizes its cache by the encoder's layer count: keep the stacks equal here)
    reference = build_hf_t5(tmp_path / "hf", num_decoder_layers=2, **VARIANTS[variant])
    model = lmstack.load_model(tmp_path / "hf").eval()
    ids, mask = _padded((9, 4, 6))
    prompts = [row[:int(m.sum())].tolist() for row, m in zip(ids, mask)]
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                      output_scores=True, return_dict_in_generate=True)
        got = lmstack.generate(model, None, prompts, max_new_tokens=10, logprobs=True)
        assert got.token_ids == _hf_new_tokens(expected.sequences)
        hf_logprobs = torch.stack(expected.scores, 1).log_softmax(-1)  # (B, N, V)
        for row, (tokens, logprobs) in enumerate(zip(got.token_ids, got.logprobs)):
            want = hf_logprobs[row, torch.arange(len(tokens)), tokens]
            assert logprobs == pytest.approx(want.tolist(), abs=1e-4)
        beams = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=3,
                                   num_return_sequences=2, length_penalty=0.7, do_sample=False,
                                   output_scores=True, return_dict_in_generate=True)
        got = lmstack.generate(model, None, prompts, max_new_tokens=8, num_beams=3, num_return_sequences=2,
                               length_penalty=0.7)
    ours = [h.token_ids for hyps in got.beams for h in hyps]
    assert ours == _hf_new_tokens(beams.sequences)
    scores = [h.score for hyps in got.beams for h in hyps]
    assert scores == pytest.approx(beams.sequences_scores.tolist(), abs=1e-4)


def test_t5_sampling_is_seeded_and_cached_decoding_equals_a_full_forward(tmp_path):
    from lmstack.model.seq2seq_decoder import BoundDecoder

    build_hf_t5(tmp_path / "hf", **VARIANTS["t5-1.1"])
    model = lmstack.load_model(tmp_path / "hf").eval()
    prompts = [[5, 6, 7, 8, 1], [9, 10, 1]]
    options = dict(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True)
    a, b = lmstack.generate(model, None, prompts, **options), lmstack.generate(model, None, prompts, **options)
    assert a.token_ids == b.token_ids and len(a.token_ids[0]) == 12
    alone = lmstack.generate(model, None, prompts[1:], max_new_tokens=12, ignore_eos=True)
    greedy = lmstack.generate(model, None, prompts, max_new_tokens=12, ignore_eos=True).token_ids
    assert greedy[1] == alone.token_ids[0]
    model.train()  # generation runs without dropout (the encoder pass too) and leaves the model's mode as it was
    assert lmstack.generate(model, None, prompts, max_new_tokens=12, ignore_eos=True).token_ids == greedy
    assert model.training
    model.eval()
    # the cached step-by-step logits, rows at different decoder positions, equal one full decoder pass
    ids, mask = _padded((5, 3))
    ids[0, :5], ids[1, :3] = torch.tensor(prompts[0]), torch.tensor(prompts[1])
    decoder_ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.tensor(a.token_ids)[:, :-1]], 1)
    with torch.no_grad():
        full = model(ids, mask, decoder_ids)  # (2, 12, V)
        decoder = BoundDecoder(model, prompts)
        caches = decoder.make_cache(2, 16)
        decoder.use_caches(caches)
        first = decoder(decoder_ids[:, :3], cache_slots=torch.arange(3))  # both rows: positions 0-2
        decoder.use_caches([cache.rows(1, 2) for cache in caches])
        ahead = decoder(decoder_ids[1:2, 3:5], cache_slots=torch.arange(3, 5))  # row 1 alone runs 2 ahead
        decoder.use_caches(caches)
        stepwise = []
        for t in range(3, 10):  # then one token per row per call: row 0 at position t, row 1 at t + 2
            step = torch.stack([decoder_ids[0, t], decoder_ids[1, t + 2]])[:, None]  # (2, 1)
            stepwise.append(decoder(step, cache_slots=torch.tensor([[t], [t + 2]]))[:, 0])
    got = torch.stack(stepwise, 1)  # (2, 7, V)
    assert (full[:, :3] - first).abs().max().item() <= TOL
    assert (full[1, 3:5] - ahead[0]).abs().max().item() <= TOL
    assert (full[0, 3:10] - got[0]).abs().max().item() <= TOL
    assert (full[1, 5:12] - got[1]).abs().max().item() <= TOL
