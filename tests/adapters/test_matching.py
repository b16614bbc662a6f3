"""Which modules an adapter targets (peft's rules), and the messages when a config matches nothing."""

from __future__ import annotations

import pytest
import torch

import lmstack
from lmstack.adapters import LoraConfig, LoraLinear, apply_lora, disable_adapters
from lmstack.errors import ConfigError


def targets(cfg: LoraConfig, preset: str = "llama-tiny") -> set[str]:
    model = lmstack.load_model(preset, **({"num_layers": 2} if preset.startswith("gpt2") else {}))
    return {n for n in apply_lora(model, cfg)}


def test_target_modules_list_regex_all_linear_and_exclusions():
    assert targets(LoraConfig(target_modules=["q_proj", "v_proj"])) == {
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"}
    assert targets(LoraConfig(target_modules=r".*layers\.1\.mlp\..*")) == {
        f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    every = targets(LoraConfig(target_modules="all-linear"))
    assert len(every) == 14 and "lm_head" not in every
    assert len(targets(LoraConfig(exclude_modules=["down_proj"]))) == 12
    # Hugging Face's GPT-2 names reach lmstack's split linears
    gpt2 = targets(LoraConfig(target_modules=["c_attn"]), "gpt2")
    assert gpt2 == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkv"}


def test_rank_and_alpha_patterns_follow_peft():
    model = lmstack.load_model("llama-tiny")
    apply_lora(model, LoraConfig(r=8, lora_alpha=16, rank_pattern={"q_proj": 2}, alpha_pattern={"layers.1.self_attn.v_proj": 4},
                                 use_rslora=True))
    q, v0, v1 = (model.get_submodule(f"model.layers.{n}") for n in ("0.self_attn.q_proj", "0.self_attn.v_proj",
                                                                     "1.self_attn.v_proj"))
    assert (q.r, v0.r, v1.r) == (2, 8, 8) and v1.scaling == pytest.approx(4 / 8**0.5)
    assert v0.scaling == pytest.approx(16 / 8**0.5)


def test_nothing_matched_is_an_error_naming_the_layers():
    with pytest.raises(ConfigError, match="matches no linear layer.*gate_proj.*q_proj"):
        targets(LoraConfig(target_modules=["query", "value"]))
    with pytest.raises(ConfigError, match="modules_to_save: 'score' names no module"):
        targets(LoraConfig(modules_to_save=["score"]))


def test_disabled_adapters_give_the_base_model():
    model = lmstack.load_model("llama-tiny").eval()
    x = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        base = model(x)
        apply_lora(model, LoraConfig(use_dora=True))
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.normal_()
        assert (model(x) - base).abs().max() > 1e-3
        with disable_adapters(model):
            torch.testing.assert_close(model(x), base)


def test_lora_trains_over_a_linear_large_enough_for_the_onednn_path():
    """The base's training GEMM may run in a custom op (lmstack.model.linear) whose output is a view: the
    adapter must not add into it in place."""
    from lmstack.model.linear import Linear
    layer = LoraLinear(Linear(512, 1376, bias=False).requires_grad_(False), r=4, lora_alpha=8)
    x = torch.randn(1, 64, 512, requires_grad=True)  # 64 * 512 * 1376 multiply-adds: over the oneDNN threshold
    layer(x).sum().backward()
    assert layer.lora_A.weight.grad is not None and x.grad is not None
