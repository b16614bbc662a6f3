"""Training parity with transformers: the same loss and the same gradient on every parameter, through
both of lmstack's CPU linear paths (MKL below the oneDNN size threshold, oneDNN above it)."""

from __future__ import annotations

import pytest
import torch

import lmstack
import lmstack.model.linear as linear
from lmstack.train.objectives import causal_lm_loss
from tests.parity.hf_models import build_hf_model

TOL = 1e-4  # relative to each gradient's largest entry


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])  # qwen2: qkv biases and tied embeddings
@pytest.mark.parametrize("onednn", [False, True])
def test_loss_and_gradients_match_transformers(family, onednn, tmp_path, monkeypatch):
    monkeypatch.setattr(linear, "_MIN_MACS", 0 if onednn else 2**62)
    reference = build_hf_model(family, tmp_path / "hf").train()
    model = lmstack.load_model(tmp_path / "hf").train()
    calls = []
    monkeypatch.setattr(linear, "onednn_linear", lambda *a: calls.append(1) or torch.ops.lmstack.onednn_linear(*a))

    ids = torch.randint(0, 211, (3, 17), generator=torch.Generator().manual_seed(0))
    expected_loss = reference(ids, labels=ids).loss  # transformers shifts the labels itself
    loss = causal_lm_loss(model, ids[:, :-1], ids[:, 1:]).mean()
    expected_loss.backward()
    loss.backward()
    assert (len(calls) > 0) == onednn
    assert abs(loss.item() - expected_loss.item()) <= 1e-5
    reference_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        want = reference_params[name].grad
        scale = want.abs().max().item()
        assert scale > 0, name
        assert (param.grad - want).abs().max().item() <= TOL * scale, name


def test_onednn_linear_gradients_with_a_frozen_weight_and_bias():
    """A frozen base weight (LoRA, QLoRA) still passes the input gradient; a bias gets its own."""
    torch.manual_seed(0)
    layer = linear.Linear(96, 80, bias=True)
    layer.weight.requires_grad_(False)
    x = torch.randn(4, 7, 96, requires_grad=True)
    out = linear.onednn_linear(x, layer.weight) + layer.bias
    grad = torch.randn_like(out)
    out.backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = layer.bias.detach().clone().requires_grad_()
    torch.nn.functional.linear(x_ref, layer.weight, bias_ref).backward(grad)
    torch.testing.assert_close(out, torch.nn.functional.linear(x_ref, layer.weight, bias_ref))
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.bias.grad, bias_ref.grad)
    assert layer.weight.grad is None


def test_inference_and_autocast_keep_f_linear(monkeypatch):
    monkeypatch.setattr(linear, "_MIN_MACS", 0)
    x, weight = torch.randn(2, 8), torch.randn(4, 8)
    assert linear.use_onednn(x, weight) == linear._ONEDNN
    with torch.no_grad():
        assert not linear.use_onednn(x, weight)  # a compiled decode step must see aten linear to pack weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not linear.use_onednn(x, weight)  # a custom op would escape the autocast policy
    assert not linear.use_onednn(x.double(), weight.double())
