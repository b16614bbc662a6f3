"""Positions: rotary embeddings with their context-extension scalings, and sinusoidal tables.

cos/sin are computed from position ids on the fly in fp32, once per forward, and shared by every
layer. That costs (B, T, D/2) multiplies, avoids a (max_seq_len, D) table that would be 134 MB at
Llama-3's 131k context, and handles left-padded batches whose rows start at different positions.

Scalings (`RopeScaling.kind`), as Hugging Face's `rope_scaling` types define them (L = the trained
context, `original_max_position_embeddings`; s = `factor`; b = theta; D = head dim):
    linear    every frequency / s (position interpolation)
    llama3    long wavelengths / s, short ones kept, a smooth band between
    ntk       static NTK-aware: base b * s^(D/(D-2)) (no Hugging Face type: it is saved as a plain theta)
    dynamic   NTK with s grown to each row's length n: base b * (s*n/L - (s-1))^(D/(D-2)) once n > L
    yarn      per frequency, interpolated (/ s) below beta_slow rotations over L, kept above beta_fast,
              a linear ramp between; cos and sin scaled by 0.1*ln(s) + 1
    longrope  per-frequency divisors: short_factor while a row fits in L, long_factor beyond; cos and
              sin scaled by sqrt(1 + ln(s)/ln(L))
dynamic and longrope depend on the length, which Hugging Face takes over the whole batch (max position
+ 1); here it is each row's own, so a row gives the same logits batched (and padded) as alone.
"""

from __future__ import annotations

import math

import torch

from lmstack.config import ModelConfig, RopeScaling


def _exponents(dim: int, device: torch.device | str | None) -> torch.Tensor:
    """(D/2,) the exponents 2i/D, as Hugging Face computes them (int64 arange, then float)."""
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies (D/2,) for RoPE, with the config's scaling applied (as Hugging Face computes them).

    For dynamic NTK these are the frequencies up to the trained context, for LongRoPE the short ones:
    `rope_cos_sin` replaces them per row where a row is longer.
    """
    dim, theta, scaling = config.head_dim, config.rope_theta, config.rope_scaling
    if scaling.kind == "ntk":
        theta = ntk_theta(theta, scaling.factor, dim)
    inv_freq = 1.0 / (theta ** _exponents(dim, device))
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
    elif scaling.kind == "yarn":
        inv_freq = _yarn_inv_freq(theta, dim, scaling, device)
    elif scaling.kind == "longrope":
        inv_freq = inv_freq / torch.tensor(scaling.short_factor, dtype=torch.float32, device=device)
    return inv_freq


def ntk_theta(theta: float, factor: float, dim: int) -> float:
    """Static NTK-aware scaling: the base that stretches the lowest frequency by `factor` and keeps the highest."""
    return theta * factor ** (dim / (dim - 2))


def _yarn_inv_freq(theta: float, dim: int, scaling: RopeScaling, device: torch.device | str | None) -> torch.Tensor:
    """YaRN (Peng et al. 2023): frequencies that turn fewer than beta_slow times over the trained context are
    interpolated, those that turn more than beta_fast times are kept, with a linear ramp in between."""
    old_len = scaling.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:  # the dimension whose frequency turns `rotations` times in old_len
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # Hugging Face's guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    pos_freqs = theta ** _exponents(dim, device)
    return (1.0 / (scaling.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def rope_attention_factor(scaling: RopeScaling) -> float:
    """The factor on cos and sin (so on every attention logit, squared) that YaRN and LongRoPE apply."""
    if scaling.kind not in ("yarn", "longrope"):
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    factor = scaling.factor
    if scaling.kind == "longrope":
        old_len = scaling.original_max_position_embeddings
        return math.sqrt(1 + math.log(factor) / math.log(old_len)) if factor > 1 else 1.0

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim)
    return mscale(factor)


def _per_row_inv_freq(config: ModelConfig, inv_freq: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Dynamic NTK / LongRoPE: (B, D/2) frequencies for each row's length (its largest position + 1)."""
    scaling, dim = config.rope_scaling, config.head_dim
    old_len = scaling.original_max_position_embeddings
    length = position_ids.amax(dim=-1) + 1  # (B,)
    exponents = _exponents(dim, position_ids.device)
    if scaling.kind == "dynamic":
        # fp32 throughout, as Hugging Face computes it from a tensor length; equal to plain RoPE up to old_len
        n = length.clamp(min=old_len).float()
        base = config.rope_theta * (scaling.factor * n / old_len - (scaling.factor - 1)) ** (dim / (dim - 2))  # (B,)
        return 1.0 / base[:, None] ** exponents[None, :]
    long = 1.0 / (torch.tensor(scaling.long_factor, dtype=torch.float32, device=position_ids.device)
                  * config.rope_theta ** exponents)  # (D/2,)
    return torch.where((length > old_len)[:, None], long[None, :], inv_freq[None, :])


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, config: ModelConfig | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (B, T) -> cos, sin of shape (B, 1, T, D), in fp32, ready to broadcast over heads.

    inv_freq (D/2,) from `rope_inv_freq`; with `config`, its length-dependent scalings (dynamic NTK,
    LongRoPE) and the attention factor (YaRN, LongRoPE) are applied too.
    """
    scaling = config.rope_scaling if config is not None else None
    if scaling is not None and scaling.kind in ("dynamic", "longrope"):
        per_row = _per_row_inv_freq(config, inv_freq, position_ids)  # (B, D/2)
    else:
        per_row = inv_freq[None, :]  # (1, D/2)
    freqs = position_ids[:, :, None].float() * per_row[:, None, :]  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D): HF's half-split layout, not interleaved
    cos, sin = emb.cos(), emb.sin()
    factor = rope_attention_factor(scaling) if scaling is not None else 1.0
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos[:, None], sin[:, None]


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
