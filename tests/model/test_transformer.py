"""The Transformer on its own: KV-cache decoding equals the full forward, masks, init, config validation."""

from __future__ import annotations

import math

import pytest
import torch

from lmstack import ModelConfig, Transformer, preset
from lmstack.errors import ConfigError

TINY = dict(vocab_size=97, hidden_size=48, num_layers=2, num_heads=4, intermediate_size=80, max_seq_len=64)
VARIANTS = {
    "llama-gqa": dict(num_kv_heads=2),
    "mqa-linear-rope": dict(num_kv_heads=1, rope_scaling=dict(kind="linear", factor=2.0)),
    "llama3-rope": dict(num_kv_heads=2, rope_scaling=dict(kind="llama3", factor=8.0,
                                                          original_max_position_embeddings=16)),
    "sliding-window": dict(num_kv_heads=2, sliding_window=5, family="mistral"),
    "gpt2-like": dict(mlp_kind="gelu_tanh", norm_kind="layernorm", norm_bias=True, position_kind="learned",
                      qkv_bias=True, out_bias=True, mlp_bias=True, tie_word_embeddings=True, family="gpt2"),
    "sinusoidal-relu": dict(position_kind="sinusoidal", mlp_kind="relu", norm_kind="layernorm"),
}


def _model(variant: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**TINY, **VARIANTS[variant])).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_incremental_decoding_matches_full_forward(variant):
    model = _model(variant)
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(batch_size=2, max_len=32)
        prefill = model(ids[:, :12], cache_slots=torch.arange(12))  # a 12-token prompt
        steps = [model(ids[:, t:t + 1], cache_slots=torch.tensor([t])) for t in range(12, 20)]  # 1 token at a time
    incremental = torch.cat([prefill, *steps], dim=1)
    assert (incremental - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("variant", ["llama-gqa", "gpt2-like", "sliding-window"])
def test_incremental_decoding_left_padded_batch(variant):
    """Row 1 is left-padded by 4; cached decoding of both rows equals each row's own full forward."""
    model = _model(variant)
    ids = torch.randint(0, 97, (2, 14))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :4] = 0
    S = 20
    cache_mask = torch.zeros(2, S, dtype=torch.long)
    cache_mask[:, :14] = mask
    with torch.no_grad():
        model.setup_cache(batch_size=2, max_len=S)
        prefill = model(ids[:, :10], attention_mask=cache_mask, cache_slots=torch.arange(10))
        steps = [model(ids[:, t:t + 1], attention_mask=cache_mask, cache_slots=torch.tensor([t])) for t in range(10, 14)]
        model.clear_cache()
        out = torch.cat([prefill, *steps], dim=1)
        alone0, alone1 = model(ids[:1]), model(ids[1:, 4:])
    assert (out[0] - alone0[0]).abs().max().item() < 1e-5
    assert (out[1, 4:] - alone1[0]).abs().max().item() < 1e-5


def test_sliding_window_limits_attention():
    """With window w, a token's logits do not depend on tokens w or more positions back."""
    model = _model("sliding-window")  # window 5, 2 layers -> receptive field 2 * 4 + 1 tokens
    ids = torch.randint(0, 97, (1, 20))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 97
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[0, 9:], b[0, 9:])  # out of reach of token 0 after two layers
    assert not torch.equal(a[0, 1:5], b[0, 1:5])


def test_padding_rows_stay_finite():
    model = _model("llama-gqa")
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        out = model(torch.randint(0, 97, (2, 5)), attention_mask=mask)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("variant", ["llama-gqa", "gpt2-like"])
def test_an_explicit_boolean_mask_with_positions_is_used_as_given(variant):
    """A (B, 1, T, T) mask + position_ids: two sequences side by side in one row, each seeing only itself and
    counting its own positions, give each sequence's own logits (the evaluator's tree rows rely on it)."""
    model = _model(variant)
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 5))
    side_by_side = torch.cat([a, b], dim=1)  # (1, 12)
    owner = torch.tensor([0] * 7 + [1] * 5)
    mask = (owner[:, None] == owner[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()  # (T, T)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]  # (1, T)
    with torch.no_grad():
        out = model(side_by_side, attention_mask=mask[None, None], position_ids=positions)
        assert torch.allclose(out[:, :7], model(a), atol=1e-5) and torch.allclose(out[:, 7:], model(b), atol=1e-5)
    with pytest.raises(ValueError, match="position_ids"):
        model(side_by_side, attention_mask=mask[None, None])


def test_initialisation_scales_residual_projections():
    config = ModelConfig(vocab_size=1000, hidden_size=256, num_layers=8, num_heads=4, intermediate_size=512)
    model = Transformer(config)
    block = model.model.layers[0]
    assert abs(block.self_attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert abs(block.mlp.down_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.001
    assert torch.equal(block.input_layernorm.weight, torch.ones(256))


def test_tied_embeddings_share_storage():
    model = Transformer(preset("llama-tiny"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


def test_training_mode_dropout_and_checkpointing_gradients_match():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, num_kv_heads=2))
    ids = torch.randint(0, 97, (2, 16))
    model.train()
    model(ids).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing = True
    model(ids).sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, plain[name], atol=1e-5), name


def test_too_long_sequence_is_a_clear_error():
    model = _model("llama-gqa")
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("fields, message", [
    (dict(num_heads=6, num_kv_heads=4, hidden_size=48), "divisible by num_kv_heads"),
    (dict(hidden_size=50, num_heads=4), "divisible by num_heads"),
    (dict(dropout=1.5), "dropout"),
    (dict(vocab_size=0), "vocab_size must be positive"),
    (dict(norm_kind="rmsnorm", norm_bias=True), "norm_bias"),
])
def test_config_validation_names_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**TINY, **fields})


def test_config_from_dict_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigError, match="unknown key hiden_size"):
        ModelConfig.from_dict({"hiden_size": 3})
    with pytest.raises(ConfigError, match="rope_scaling.factor: expected a number"):
        ModelConfig.from_dict({"rope_scaling": {"kind": "linear", "factor": "big"}})
    with pytest.raises(ConfigError, match="mlp_kind: expected one of"):
        ModelConfig.from_dict({"mlp_kind": "swish"})


def test_presets_have_the_published_parameter_counts():
    from lmstack.model.cost import model_cost

    expected = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "llama-8b": 8_030_261_248,
                "mistral-7b": 7_241_732_096, "qwen2-0.5b": 494_032_768, "smollm-135m": 134_515_008,
                "llama-1b": 1_235_814_400}
    for name, count in expected.items():
        assert model_cost(preset(name)).parameters == count, name
