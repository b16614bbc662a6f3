"""LoRA, rsLoRA and DoRA adapters move both ways between lmstack and peft with the same logits (1e-5).

peft side: `peft.get_peft_model` / `PeftModel.from_pretrained` on the transformers model; lmstack side:
`apply_lora` / `save_adapter` / `load_model(base, adapter=dir)` on the same weights. GPT-2 covers peft's
fused, transposed Conv1D (`c_attn`, fan_in_fan_out) against lmstack's separate q/k/v linears.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import lmstack
from lmstack.adapters import LoraConfig, apply_lora, merge_adapters, save_adapter, unload, unmerge_adapters
from tests.adapters.conftest import ids, peft, randomize_adapter_weights, transformers

VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True},
            "modules_to_save": {"modules_to_save": ["lm_head"]}, "tokens": {"trainable_token_indices": [3, 5, 200]}}
TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "qwen2": "all-linear", "gpt2": ["c_attn", "c_proj", "c_fc"]}
CASES = [("llama", "lora"), ("llama", "rslora"), ("llama", "dora"), ("qwen2", "dora"), ("gpt2", "lora"),
         ("gpt2", "dora"), ("llama", "modules_to_save"), ("llama", "tokens"), ("qwen2", "tokens")]


def peft_model(base, family: str, variant: str):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], task_type="CAUSAL_LM",
                             fan_in_fan_out=family == "gpt2", **VARIANTS[variant])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, config)


@pytest.mark.parametrize("family,variant", CASES)
def test_peft_adapter_loads_in_lmstack(hf_base, tmp_path, family, variant):
    directory, _ = hf_base(family)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    adapted = peft_model(model, family, variant)
    randomize_adapter_weights(adapted)
    adapted.save_pretrained(tmp_path / "adapter")
    x = ids()
    with torch.no_grad():
        expected = adapted(x).logits
        ours = lmstack.load_model(directory, adapter=tmp_path / "adapter").eval()
        got = ours(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), adapted.disable_adapter():
        assert (got - adapted(x).logits).abs().max() > 1e-3  # the adapter changed something


@pytest.mark.parametrize("family,variant", CASES)
def test_lmstack_adapter_loads_in_peft(hf_base, tmp_path, family, variant):
    directory, _ = hf_base(family)
    ours = lmstack.load_model(directory)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **VARIANTS[variant])
    apply_lora(ours, cfg)
    randomize_adapter_weights(ours)
    ours.eval()
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(directory))
    x = ids()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.AutoModelForCausalLM.from_pretrained(directory)
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        torch.testing.assert_close(ours(x), theirs(x).logits, atol=1e-5, rtol=1e-5)
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["use_dora"] == (variant == "dora")
    assert written["fan_in_fan_out"] == (family == "gpt2")


@pytest.mark.parametrize("family,variant", [("llama", "lora"), ("llama", "dora"), ("gpt2", "dora")])
def test_merge_unmerge_and_unload_keep_the_adapted_logits(hf_base, tmp_path, family, variant):
    directory, _ = hf_base(family)
    model = lmstack.load_model(directory)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **VARIANTS[variant]))
    randomize_adapter_weights(model)
    model.eval()
    x = ids()
    with torch.no_grad():
        adapted = model(x)
        merge_adapters(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
        unmerge_adapters(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
        unload(model)
        assert not any("lora" in n for n, _ in model.named_parameters())
        lmstack.save_model(model, tmp_path / "merged")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(reloaded(x).logits, adapted, atol=1e-5, rtol=1e-5)
