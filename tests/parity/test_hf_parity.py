"""Logits parity with transformers for each family, both directions, incl. a left-padded batch."""

from __future__ import annotations

import json

import pytest
import torch

import lmstack
from lmstack.interop.hf_config import config_from_hf, config_to_hf
from tests.parity.hf_models import FAMILIES, build_hf_model

TOL = 1e-4


def _left_padded_batch(vocab: int, lengths=(11, 6, 3)):
    T = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T))
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, T - n:] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_load_from_transformers_matches_logits(family, tmp_path):
    reference = build_hf_model(family, tmp_path / "hf")
    model = lmstack.load_model(tmp_path / "hf").eval()
    assert model.config.family == family

    ids = torch.randint(0, 211, (2, 19))
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL

    ids, mask, position_ids = _left_padded_batch(211)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, position_ids=position_ids).logits
        got = model(ids, attention_mask=mask)  # lmstack derives the same positions from the mask
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= TOL

    # A left-padded row gives the same logits as the unpadded sequence alone.
    with torch.no_grad():
        alone = model(ids[2:3, -3:])
    assert (got[2, -3:] - alone[0]).abs().max().item() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_save_from_lmstack_loads_in_transformers(family, tmp_path):
    import transformers

    build_hf_model(family, tmp_path / "hf")
    model = lmstack.load_model(tmp_path / "hf").eval()
    lmstack.save_model(model, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(reloaded).__name__ == json.loads((tmp_path / "out/config.json").read_text())["architectures"][0]
    ids, mask, position_ids = _left_padded_batch(211)
    with torch.no_grad():
        expected = reloaded(ids, attention_mask=mask, position_ids=position_ids).logits
        got = model(ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= TOL


def test_preset_model_saves_and_loads_in_transformers(tmp_path):
    import transformers

    model = lmstack.load_model("llama-tiny").eval()
    lmstack.save_model(model, tmp_path / "tiny", max_shard_bytes=100_000)  # forces several shards + index
    assert (tmp_path / "tiny/model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    with torch.no_grad():
        assert (model(ids) - reloaded(ids).logits).abs().max().item() <= TOL
    again = lmstack.load_model(tmp_path / "tiny").eval()
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trip(family, tmp_path):
    build_hf_model(family, tmp_path / "hf")
    hf = json.loads((tmp_path / "hf/config.json").read_text())
    config = config_from_hf(hf)
    written = config_to_hf(config)
    assert "lmstack" not in written  # the Hugging Face keys alone hold the config: one home per value
    assert config_from_hf(written) == config
    keys = {"llama": ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"],
            "gpt2": ["vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "layer_norm_epsilon",
                     "activation_function"]}
    for key in keys["gpt2" if family == "gpt2" else "llama"]:
        assert written[key] == hf[key], key
    if family != "gpt2":
        assert written["rope_theta"] == hf["rope_parameters"]["rope_theta"]
        assert written.get("sliding_window") == hf.get("sliding_window")


@pytest.mark.parametrize("scaling", [dict(kind="linear", factor=4.0),
                                     dict(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=32)])
def test_rope_scaling_written_once_loads_in_transformers(scaling, tmp_path):
    import transformers

    config = lmstack.preset("llama-tiny", rope_theta=500.0, rope_scaling=scaling)
    model = lmstack.Transformer(config).eval()
    lmstack.save_model(model, tmp_path / "scaled")
    written = json.loads((tmp_path / "scaled/config.json").read_text())
    assert "rope_parameters" not in written and written["rope_theta"] == 500.0  # theta has one home
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "scaled", dtype=torch.float32).eval()
    assert reloaded.config.rope_parameters["rope_type"] == scaling["kind"]
    assert reloaded.config.rope_parameters["rope_theta"] == 500.0
    ids = torch.randint(0, config.vocab_size, (2, 64))
    with torch.no_grad():
        assert (model(ids) - reloaded(ids).logits).abs().max().item() <= TOL
    assert lmstack.load_model(tmp_path / "scaled").config == config
