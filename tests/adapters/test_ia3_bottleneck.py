"""IA3 against peft (logits within 1e-5, adapter directories both ways, GPT-2's fused c_attn included, merge),
bottleneck adapters in lmstack's own format, and gradients only into each method's parameters."""

from __future__ import annotations

import json

import pytest
import torch

import lmstack
from lmstack.adapters import (
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    apply_bottleneck,
    apply_ia3,
    apply_lora,
    disable_adapters,
    save_adapter,
    unload,
)
from lmstack.adapters.bottleneck import BottleneckAdapter
from lmstack.errors import CheckpointError, ConfigError
from tests.adapters.conftest import ids, peft, transformers

pytestmark = pytest.mark.filterwarnings("ignore")


@torch.no_grad()
def randomize(model: torch.nn.Module, leaves=("ia3_l", "adapter_up", "adapter_down")) -> None:
    g = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        if any(k in name for k in leaves):
            p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_peft_ia3_loads_in_lmstack(hf_base, tmp_path, family):
    directory, _ = hf_base(family)
    adapted = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(directory),
                                  peft.IA3Config(task_type="CAUSAL_LM", fan_in_fan_out=family == "gpt2")).eval()
    randomize(adapted)
    adapted.save_pretrained(tmp_path / "adapter")
    x = ids()
    with torch.no_grad():
        expected = adapted(x).logits
        ours = lmstack.load_model(directory, adapter=tmp_path / "adapter").eval()
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        with disable_adapters(ours):
            assert (ours(x) - expected).abs().max() > 1e-3
        merged = unload(ours)  # IA3 folds into the weights
        assert not any("ia3_l" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lmstack_ia3_loads_in_peft(hf_base, tmp_path, family):
    directory, _ = hf_base(family)
    ours = lmstack.load_model(directory)
    adapted = apply_ia3(ours, IA3Config())
    randomize(ours)
    ours.eval()
    save_adapter(ours, tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == "IA3" and written["fan_in_fan_out"] == (family == "gpt2")
    if family == "gpt2":  # peft's default adapts the fused c_attn: q, k and v each get a third
        assert "model.layers.0.self_attn.q_proj" in adapted
    x = ids()
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(directory),
                                                tmp_path / "adapter").eval()
        torch.testing.assert_close(ours(x), theirs(x).logits, atol=1e-5, rtol=1e-5)


def test_ia3_on_part_of_gpt2s_fused_attention_scales_the_rest_by_one(hf_base, tmp_path):
    directory, _ = hf_base("gpt2")
    ours = lmstack.load_model(directory)
    apply_ia3(ours, IA3Config(target_modules=["k_proj", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]))
    randomize(ours)
    ours.eval()
    save_adapter(ours, tmp_path / "adapter")
    x = ids()
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(directory),
                                                tmp_path / "adapter").eval()
        torch.testing.assert_close(ours(x), theirs(x).logits, atol=1e-5, rtol=1e-5)


METHODS = {
    "ia3": (lambda m: apply_ia3(m, IA3Config()), ("ia3_l",)),
    "houlsby": (lambda m: apply_bottleneck(m, BottleneckConfig()), ("adapter_down", "adapter_up")),
    "pfeiffer": (lambda m: apply_bottleneck(m, BottleneckConfig(placement="pfeiffer", bottleneck_size=4)),
                 ("adapter_down", "adapter_up")),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_gradients_reach_only_the_method(method):
    model = lmstack.Transformer(lmstack.preset("llama-tiny"))
    apply, leaves = METHODS[method]
    apply(model)
    randomize(model)  # a zero up-projection would give the down-projection no gradient
    x = ids(model.config.vocab_size, 2, 12)
    model(x, targets=x).backward()
    trained = 0
    for name, p in model.named_parameters():
        if any(f".{leaf}" in name for leaf in leaves):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            trained += 1
        else:
            assert not p.requires_grad and p.grad is None, name
    assert trained > 0


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_bottleneck_starts_as_the_base_and_round_trips_its_directory(tmp_path, placement):
    base = lmstack.Transformer(lmstack.preset("llama-tiny"))
    lmstack.save_model(base, tmp_path / "base")
    model = lmstack.load_model(tmp_path / "base").eval()
    x = ids(model.config.vocab_size)
    with torch.no_grad():
        before = model(x)
        names = apply_bottleneck(model, BottleneckConfig(placement=placement, reduction_factor=8))
        torch.testing.assert_close(model(x), before)  # up-projection zero: exactly the base
        randomize(model)
        after = model(x)
    assert (after - before).abs().max() > 1e-3
    assert len(names) == model.config.num_layers * (2 if placement == "houlsby" else 1)
    save_adapter(model, tmp_path / "adapter")
    fields = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert fields["peft_type"] == "LMSTACK_BOTTLENECK" and fields["placement"] == placement
    assert fields["bottleneck_size"] == model.config.hidden_size // 8
    loaded = lmstack.load_model(tmp_path / "base", adapter=tmp_path / "adapter").eval()
    assert sum(isinstance(m, BottleneckAdapter) for m in loaded.modules()) == len(names)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), after, atol=0, rtol=0)


def test_bad_input_is_named(tmp_path):
    model = lmstack.Transformer(lmstack.preset("llama-tiny"))
    with pytest.raises(ConfigError, match="match no linear layer"):
        apply_ia3(model, IA3Config(target_modules=["nope"]))
    lmstack.save_model(model, tmp_path / "base")
    lora = lmstack.load_model(tmp_path / "base")
    apply_lora(lora, LoraConfig(r=2))
    save_adapter(lora, tmp_path / "lora")
    config = tmp_path / "lora" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="peft_type IA3, but the weights hold the tensors of a LORA adapter"):
        lmstack.load_model(tmp_path / "base", adapter=tmp_path / "lora")
    other = lmstack.Transformer(lmstack.preset("llama-tiny", hidden_size=96))
    apply_ia3(other, IA3Config())
    save_adapter(other, tmp_path / "ia3")
    with pytest.raises(CheckpointError, match="another base model"):
        lmstack.load_model(tmp_path / "base", adapter=tmp_path / "ia3")
