"""Quantization-aware training: fake-quantized linears trained as usual, then converted to real int weights.

`FakeQuantLinear` is an `nn.Linear` (same parameter names, so optimizers, checkpoints and the engine see an
ordinary model) whose forward uses the weight rounded exactly as round-to-nearest will store it:

    w_fq = (clamp(round(w / s) + z, 0, 2^b - 1) - z) * s      (s, z from the current weight, per group)

with a straight-through gradient (d w_fq / d w = 1: `w + (w_fq - w).detach()`), so the weights learn to
sit where rounding costs little. `convert_qat` then replaces each one by the `IntLinear` holding
exactly those codes: the converted model computes what the fake-quantized model computed.

    prepare_qat(model, bits=4, group_size=128)   # swap in FakeQuantLinear by name
    ... train with the engine (lmstack quantize --method qat does: lmstack.cli.quantize) ...
    convert_qat(model)                            # IntLinear modules, ready to save
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.quant.formats import check_group_size, qparams, quantize_codes, quantize_rtn
from lmstack.quant.linear import IntLinear, swap_module, target_linears


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool = False) -> torch.Tensor:
    """The weight as RTN will store it (same scales, zero points and rounding), with a straight-through gradient."""
    N, K = w.shape
    g = group_size or K
    groups = w.view(N, K // g, g)  # (N, G, g)
    with torch.no_grad():
        scale, zero = qparams(groups, bits, symmetric)
        codes = quantize_codes(groups, scale, zero, bits)
        w_q = ((codes - zero[..., None]) * scale[..., None]).view(N, K).to(w.dtype)
    return w + (w_q - w).detach()


class FakeQuantLinear(nn.Linear):
    """An nn.Linear whose forward sees its weight fake-quantized (see the module docstring)."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(self.weight, self.bits, self.group_size, self.symmetric), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fake int{self.bits} group={self.group_size or 'channel'}"


def prepare_qat(model: nn.Module, bits: int = 4, group_size: int | None = 128, symmetric: bool = False,
                names: list[str] | None = None) -> list[str]:
    """Turn the block linears (or `names`) into FakeQuantLinear in place (same parameters); returns their names."""
    targets = target_linears(model)
    chosen = names if names is not None else list(targets)
    for name in chosen:
        linear = targets[name]
        check_group_size(name, linear.in_features, group_size)
        linear.__class__ = FakeQuantLinear  # same object, parameters and hooks: only forward changes
        linear.bits, linear.group_size, linear.symmetric = bits, group_size, symmetric
    return chosen


def convert_qat(model: nn.Module) -> int:
    """Replace every FakeQuantLinear by the IntLinear with the codes it was simulating; returns how many."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    for name, m in found:
        w = quantize_rtn(m.weight.detach(), m.bits, m.group_size, m.symmetric)
        swap_module(model, name, IntLinear.from_weight(w, None if m.bias is None else m.bias.detach()))
    return len(found)


__all__ = ["FakeQuantLinear", "convert_qat", "fake_quantize", "prepare_qat"]
