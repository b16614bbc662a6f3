"""A quantized model directory (`lmstack quantize`'s output), and a model with a LoRA adapter, served as they
load: greedy output through the server equals `lmstack.generate` on the same model."""

from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx")

import lmstack


def test_serves_an_int8_model(start_server, tiny_model_dir, tmp_path):
    from lmstack.quant.apply import QuantConfig, quantize_model
    from lmstack.quant.checkpoint import save_quantized
    from lmstack.tokenizer import Tokenizer

    model = lmstack.load_model(tiny_model_dir).eval()
    quantize_model(model, QuantConfig(method="rtn", bits=8, group_size=None, symmetric=True))
    directory = save_quantized(model, tmp_path / "int8", source_dir=tiny_model_dir)
    quantized, tok = lmstack.load_model(directory).eval(), Tokenizer.load(directory)
    expected = lmstack.generate(quantized, tok, "The list of statements", max_new_tokens=10).texts[0]
    live = start_server(model=str(directory))
    out = httpx.post(live.url + "/v1/completions", json={"prompt": "The list of statements", "max_tokens": 10,
                                                         "temperature": 0}, timeout=60).json()
    assert out["choices"][0]["text"] == expected


def test_serves_a_model_with_an_adapter(start_server, tiny_model_dir, tmp_path):
    import torch

    from lmstack.adapters import LoraConfig, apply_lora, save_adapter
    from lmstack.tokenizer import Tokenizer

    model = lmstack.load_model(tiny_model_dir).eval()
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    save_adapter(model, tmp_path / "adapter")
    tok = Tokenizer.load(tiny_model_dir)
    prompt = "The list of statements"
    expected = lmstack.generate(model, tok, prompt, max_new_tokens=10).texts[0]
    base = lmstack.generate(lmstack.load_model(tiny_model_dir).eval(), tok, prompt, max_new_tokens=10).texts[0]
    assert expected != base  # the adapter changes the greedy text, so the comparison below can fail
    live = start_server(adapter=str(tmp_path / "adapter"))
    out = httpx.post(live.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 10, "temperature": 0},
                     timeout=60).json()
    assert out["choices"][0]["text"] == expected
