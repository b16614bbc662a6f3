"""`LoraLinear`: a linear layer with a LoRA or DoRA adapter, swapped in for the model's linear by name.

    y = base(x) + s * B(A(dropout(x)))                                   LoRA, s = alpha / r (rsLoRA: alpha / sqrt(r))
    y = base(x) + (m / n - 1) * W x' + (m / n) * s * B(A(x'))            DoRA, n = ||W + s B A|| per output row,
                                                                          x' = dropout(x), n a constant in backward

Both exactly as peft computes them (peft/tuners/lora/layer.py, dora.py), so adapters move between the two
with the same outputs. The base layer stays what it was (an lmstack `Linear`, or a quantized linear for
QLoRA, which gives its weight through `dequantize()`) and is frozen; A, B and DoRA's magnitude train.

Parameter names are peft's without the adapter name: `q_proj.base_layer.weight`, `q_proj.lora_A.weight`,
`q_proj.lora_B.weight`, `q_proj.lora_magnitude_vector`.

Shapes: in d_in, out d_out, r the rank; x (..., d_in).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import ConfigError
from lmstack.model.linear import Linear


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The (d_out, d_in) weight a linear layer applies: its `.weight`, or a quantized layer's `dequantize()`."""
    return layer.dequantize() if hasattr(layer, "dequantize") else layer.weight


class LoraLinear(nn.Module):
    """`base_layer` plus a low-rank update (and, with `use_dora`, a per-row magnitude)."""

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.lora_alpha, self.use_rslora, self.use_dora = r, lora_alpha, use_rslora, use_dora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        device = dense_weight(base_layer).device
        self.lora_A = Linear(self.in_features, r, bias=False, device=device)
        self.lora_B = Linear(r, self.out_features, bias=False, device=device)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's (and nn.Linear's) init
        nn.init.zeros_(self.lora_B.weight)  # so the adapted model starts as the base model
        if use_dora:  # m starts at ||W + s B A|| = ||W||: the same outputs as the base
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm())
        self.merged = False
        self.enabled = True  # False: the base layer alone (a reference model without a second copy)
        self._merged_norm: torch.Tensor | None = None  # DoRA: the norm used by merge(), to undo it exactly

    # -------------------------------------------------------------------------------------- forward
    def delta_weight(self) -> torch.Tensor:
        """s * B @ A: (d_out, d_in), the update LoRA adds to W."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| of each output row (d_out,), in fp32; DoRA treats it as a constant (no gradient)."""
        weight = dense_weight(self.base_layer).float()
        return torch.linalg.vector_norm(weight + self.delta_weight().float(), dim=1).to(weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or not self.enabled:
            return y
        dropped = self.lora_dropout(x)
        lora = self.lora_B(self.lora_A(dropped) * self.scaling)  # the scale on the (..., r) tensor: cheaper
        if not self.use_dora:
            return y + lora  # not in place: a base linear's output may be a view made inside a custom op (oneDNN)
        scale = self.lora_magnitude_vector / self.weight_norm()  # (d_out,)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            base = y if bias is None else y - bias  # W x, reused from the base layer's output
        else:  # peft: with dropout active, DoRA rescales W applied to the dropped-out input
            base = F.linear(dropped, dense_weight(self.base_layer).to(dropped.dtype))
        return y + (scale - 1) * base + scale * lora

    # -------------------------------------------------------------------------------------- merge
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (exact up to rounding in fp32; lossy in bf16, refused for a
        quantized base, whose weight cannot hold the sum: `merged_linear()` gives a dense copy instead)."""
        if self.merged:
            return
        base = self.base_layer
        if hasattr(base, "dequantize"):
            raise ConfigError("cannot merge an adapter into a quantized base layer in place (the sum is not "
                              "representable in 4 bits); unload() gives dense merged layers")
        base.weight.copy_(self._merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        if self.use_dora:  # W' = m / n * (W + sBA)  ->  W = W' * n / m - sBA, with the n merge() used
            restored = weight.float() * (self._merged_norm / self.lora_magnitude_vector.float())[:, None]
            weight.copy_(restored - self.delta_weight().float())
        else:
            weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False

    @torch.no_grad()
    def _merged_weight(self) -> torch.Tensor:
        weight = dense_weight(self.base_layer)
        merged = weight.float() + self.delta_weight().float()
        if self.use_dora:
            self._merged_norm = torch.linalg.vector_norm(merged, dim=1)
            merged = merged * (self.lora_magnitude_vector.float() / self._merged_norm)[:, None]
        return merged.to(weight.dtype if weight.is_floating_point() else torch.float32)

    @torch.no_grad()
    def merged_linear(self) -> nn.Module:
        """A plain `Linear` holding W merged with the adapter (from a dequantized copy for a quantized base)."""
        weight = self.base_layer.weight if self.merged else self._merged_weight()
        bias = getattr(self.base_layer, "bias", None)
        layer = Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, dora={self.use_dora}, "
                f"merged={self.merged}")


__all__ = ["LoraLinear", "dense_weight"]
