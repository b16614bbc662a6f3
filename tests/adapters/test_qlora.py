"""QLoRA's base: NF4Linear stores bitsandbytes' NF4 (4.127 bits per weight with double quantization), computes
exactly F.linear with the dequantized weight, keeps no dequantized copy for backward, and trains only the adapter."""

from __future__ import annotations

import pytest
import torch

import lmstack
from lmstack.adapters import LoraConfig, apply_lora, unload
from lmstack.adapters.qlora import NF4Linear, quantize_base, weight_bytes
from lmstack.model.linear import Linear
from lmstack.quant.nf4 import quantize_nf4


def test_nf4_linear_holds_the_shared_nf4_format_and_its_size():
    torch.manual_seed(0)
    dense = Linear(256, 192, bias=True)
    layer = NF4Linear(dense)
    reference = quantize_nf4(dense.weight.detach())
    assert torch.equal(layer.packed, reference.packed) and torch.equal(layer.absmax, reference.absmax)
    assert torch.equal(layer.dequantize(), reference.dequantize())
    assert layer.nbytes() * 8 / dense.weight.numel() == pytest.approx(4.127, abs=0.001)
    x = torch.randn(3, 5, 256, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, reference.dequantize(), dense.bias)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-6)


def test_matches_bitsandbytes_dequantization():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(1)
    dense = Linear(128, 64, bias=False)
    packed, state = bnb.functional.quantize_4bit(dense.weight.detach(), blocksize=64, quant_type="nf4",
                                                 compress_statistics=True)
    theirs = bnb.functional.dequantize_4bit(packed, state, blocksize=64, quant_type="nf4")
    torch.testing.assert_close(NF4Linear(dense).dequantize(), theirs, atol=0, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_is_lora_on_the_dequantized_base_and_only_the_adapter_trains(use_dora):
    torch.manual_seed(0)
    model = lmstack.load_model("llama-tiny")
    names = quantize_base(model)
    assert len(names) == 2 * 7 and all(isinstance(model.get_submodule(n), NF4Linear) for n in names)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, use_dora=use_dora))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    loss = model(x, targets=x)
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora" in n for n in grads)
    dense = unload(model)  # the adapter merged into dequantized copies of the base
    assert not any(isinstance(m, NF4Linear) for m in dense.modules())
    with torch.no_grad():
        torch.testing.assert_close(dense(x, targets=x), loss.detach(), atol=1e-4, rtol=1e-5)


def test_qlora_weights_take_under_a_third_of_fp32():
    model = lmstack.load_model("llama-tiny", vocab_size=64)  # linears dominate, as in a real model
    fp32 = weight_bytes(model)
    quantize_base(model)
    assert weight_bytes(model) / fp32 < 0.3
