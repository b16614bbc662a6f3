"""Positions: rotary embeddings (with linear and Llama-3 frequency scaling) and sinusoidal tables.

cos/sin are computed from position ids on the fly in fp32, once per forward, and shared by every
layer. That costs (B, T, D/2) multiplies, avoids a (max_seq_len, D) table that would be 134 MB at
Llama-3's 131k context, and handles left-padded batches whose rows start at different positions.
"""

from __future__ import annotations

import math

import torch

from lmstack.config import ModelConfig


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies (D/2,) for RoPE, with the config's scaling applied (as Hugging Face computes them)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = config.rope_scaling
    if scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        old_len = scaling.original_max_position_embeddings
        low_freq_wavelen = old_len / scaling.low_freq_factor
        high_freq_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (B, T) -> cos, sin of shape (B, 1, T, D), in fp32, ready to broadcast over heads."""
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D): HF's half-split layout, not interleaved
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the angles in cos/sin (B, 1, T, D); computed in x's dtype like HF."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # rotate_half
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def sinusoidal_embedding(position_ids: torch.Tensor, dim: int) -> torch.Tensor:
    """The Transformer paper's fixed positions: (B, T) -> (B, T, dim), sin on even, cos on odd features."""
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=position_ids.device).float() * (-math.log(10000.0) / dim))
    angles = position_ids[:, :, None].float() * inv_freq  # (B, T, dim/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (B, T, dim), interleaved
