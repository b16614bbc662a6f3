"""Normalisation layers. RMSNorm and LayerNorm both keep HF's parameter names (`weight`, `bias`)."""

from __future__ import annotations

from torch import nn

from lmstack.config import ModelConfig


def build_norm(config: ModelConfig) -> nn.Module:
    """RMSNorm (Llama family) or LayerNorm (GPT-2), width hidden_size."""
    if config.norm_kind == "rmsnorm":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
