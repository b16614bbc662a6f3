"""RoPE scaling kinds against transformers' rope_scaling types: dynamic NTK, YaRN, LongRoPE (and static NTK
against transformers' dynamic formula at a fixed length), both directions, lengths inside and beyond the
trained context."""

from __future__ import annotations

import json

import pytest
import torch

import lmstack
from lmstack.config import ModelConfig, RopeScaling
from lmstack.errors import ConfigError
from lmstack.model.rope import ntk_theta, rope_inv_freq
from tests.parity.hf_models import build_hf_model

TOL = 1e-4
TRAINED = 32  # the "original" context of these tiny models
HALF_DIM = 8  # head_dim 16

SCALINGS = {
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=TRAINED),
    "yarn-mscale": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=TRAINED, mscale=0.707,
                        mscale_all_dim=1.0, beta_fast=16.0, beta_slow=2.0),
    "longrope": dict(rope_type="longrope", original_max_position_embeddings=TRAINED,
                     short_factor=[1.0 + 0.1 * i for i in range(HALF_DIM)],
                     long_factor=[1.0 + 1.5 * i for i in range(HALF_DIM)]),
}


def _hf_llama(tmp_path, scaling: dict, max_positions: int):
    params = {**scaling, "rope_theta": 500.0}
    return build_hf_model("llama", tmp_path / "hf", max_position_embeddings=max_positions, rope_parameters=params)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_rope_scaling_matches_transformers(name, tmp_path):
    import transformers

    max_positions = TRAINED if name == "dynamic" else 4 * TRAINED
    original = _hf_llama(tmp_path, SCALINGS[name], max_positions)
    model = lmstack.load_model(tmp_path / "hf").eval()
    assert model.config.rope_scaling.kind == name.split("-")[0]
    lmstack.save_model(model, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    # transformers' dynamic frequencies only grow with the inputs it has seen: short inputs first
    for T in (20, 3 * TRAINED // 2 + 1):  # inside, then beyond the trained context
        ids = torch.randint(0, 211, (2, T))
        with torch.no_grad():
            got = model(ids)
            for reference in (original, reloaded):
                assert (got - reference(ids).logits).abs().max().item() <= TOL, (name, T)


@pytest.mark.parametrize("name", ["dynamic", "longrope"])
def test_length_dependent_scaling_is_per_row(name, tmp_path):
    """A short row batched (left-padded) with a long one keeps its own, short-context frequencies."""
    _hf_llama(tmp_path, SCALINGS[name], TRAINED if name == "dynamic" else 4 * TRAINED)
    model = lmstack.load_model(tmp_path / "hf").eval()
    long, short = torch.randint(0, 211, (1, 48)), torch.randint(0, 211, (1, 10))
    ids = torch.cat([long, torch.cat([torch.zeros(1, 38, dtype=torch.long), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :38] = 0
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        assert (batched[1, 38:] - model(short)[0]).abs().max().item() <= TOL
        assert (batched[0] - model(long)[0]).abs().max().item() <= TOL


def test_static_ntk_equals_transformers_dynamic_at_the_stretched_length(tmp_path):
    """Static NTK with factor s is transformers' dynamic NTK (factor 1) evaluated at s times its trained length."""
    import transformers

    build_hf_model("llama", tmp_path / "hf", max_position_embeddings=TRAINED,
                   rope_parameters={"rope_type": "dynamic", "factor": 1.0, "rope_theta": 500.0})
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    model = lmstack.load_model(tmp_path / "hf")
    config = model.config.replace(rope_scaling=RopeScaling(kind="ntk", factor=2.0), max_seq_len=4 * TRAINED)
    ntk = lmstack.Transformer(config).eval()
    ntk.load_state_dict(model.state_dict())
    ids = torch.randint(0, 211, (2, 2 * TRAINED))  # max position + 1 = 2 x trained: base 500 * 2^(16/14)
    with torch.no_grad():
        assert (ntk(ids) - reference(ids).logits).abs().max().item() <= TOL
    # saved as plain RoPE with that theta, which transformers reads as the same model
    lmstack.save_model(ntk, tmp_path / "ntk")
    written = json.loads((tmp_path / "ntk/config.json").read_text())
    assert written["model_type"] == "llama"
    assert written["rope_theta"] == pytest.approx(ntk_theta(500.0, 2.0, 16))
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ntk", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ntk(ids) - again(ids).logits).abs().max().item() <= TOL


def test_yarn_frequencies_by_hand():
    """Hand-computed YaRN: the highest frequencies kept, the lowest divided by the factor, attention factor."""
    from lmstack.model.rope import rope_attention_factor

    scaling = RopeScaling(kind="yarn", factor=4.0, original_max_position_embeddings=32)
    config = ModelConfig(vocab_size=11, hidden_size=64, num_layers=1, num_heads=4, rope_theta=500.0,
                         rope_scaling=scaling)
    plain = 1.0 / 500.0 ** (torch.arange(0, 16, 2).float() / 16)
    got = rope_inv_freq(config)
    assert torch.allclose(got[0], plain[0]) and torch.allclose(got[-1], plain[-1] / 4)
    assert rope_attention_factor(scaling) == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)


def test_longrope_needs_one_factor_per_frequency():
    with pytest.raises(ConfigError, match="short_factor"):
        ModelConfig(vocab_size=11, hidden_size=64, num_layers=1, num_heads=4,
                    rope_scaling=dict(kind="longrope", short_factor=[1.0], long_factor=[1.0] * 8))
