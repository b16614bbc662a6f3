"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021): a small residual MLP after a sublayer.

    BottleneckConfig, BottleneckAdapter (lmstack.adapters.inject.apply_bottleneck puts them in)

    h = sublayer(x);  h + up(act(down(h)))        down: d -> m, up: m -> d (zero at init: the base model)

Placement "houlsby" puts one after attention and one after the MLP of every block; "pfeiffer" only after the
MLP. The adapter wraps the sublayer's output projection (o_proj, down_proj), whose output is the sublayer's
output before the residual add, so the model itself is not touched. (Pfeiffer's variant in adapter-transformers
also moves a layer norm; lmstack keeps the block's norms as they are.)

peft has no bottleneck adapter, so the directory is lmstack's own, laid out like peft's:
    adapter_config.json   {"peft_type": "LMSTACK_BOTTLENECK", "placement": ..., "bottleneck_size": m,
                           "non_linearity": ..., "target_modules": [the wrapped lmstack module names], ...}
    adapter_model.safetensors   base_model.model.<module>.adapter_down.weight / .bias, .adapter_up.weight / .bias
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lmstack.errors import ConfigError

PEFT_TYPE = "LMSTACK_BOTTLENECK"
PLACES = {"houlsby": ("self_attn.o_proj", "mlp.down_proj"), "pfeiffer": ("mlp.down_proj",)}
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass
class BottleneckConfig:
    """bottleneck_size m (default hidden_size / reduction_factor), placement, non_linearity."""

    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    reduction_factor: int = 16
    bottleneck_size: int | None = None
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"

    def __post_init__(self) -> None:
        if self.reduction_factor <= 0 or (self.bottleneck_size is not None and self.bottleneck_size <= 0):
            raise ConfigError("bottleneck.reduction_factor and bottleneck_size must be positive")

    def size(self, hidden: int) -> int:
        return self.bottleneck_size or max(1, hidden // self.reduction_factor)


class BottleneckAdapter(nn.Module):
    """`base_layer(x)` plus up(act(down(base_layer(x)))): (..., d) -> (..., d)."""

    def __init__(self, base_layer: nn.Module, size: int, non_linearity: str = "relu"):
        super().__init__()
        d = base_layer.out_features
        weight = base_layer.weight
        self.base_layer = base_layer.requires_grad_(False)
        self.non_linearity = non_linearity
        self.adapter_down = nn.Linear(d, size, device=weight.device, dtype=weight.dtype)
        self.act = _ACTIVATIONS[non_linearity]()
        self.adapter_up = nn.Linear(size, d, device=weight.device, dtype=weight.dtype)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.enabled = True

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        if not self.enabled:
            return h
        return h + self.adapter_up(self.act(self.adapter_down(h)))


__all__ = ["PEFT_TYPE", "PLACES", "BottleneckAdapter", "BottleneckConfig"]
