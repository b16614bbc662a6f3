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
