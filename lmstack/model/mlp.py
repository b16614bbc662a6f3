"""The feed-forward block: SwiGLU (gate_proj, up_proj, down_proj) or a plain two-layer MLP (up_proj, down_proj)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ModelConfig
from lmstack.model.linear import Linear

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "relu": F.relu,
}


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp_kind
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        if self.kind == "swiglu":
            self.gate_proj = Linear(d, f, bias=bias)
        self.up_proj = Linear(d, f, bias=bias)
        self.down_proj = Linear(f, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d)."""
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(_ACTIVATIONS[self.kind](self.up_proj(x)))
