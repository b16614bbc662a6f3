"""Causal self-attention with GQA/MQA, RoPE, padding masks, sliding windows and a static KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ModelConfig
from lmstack.model.kv_cache import KVCache
from lmstack.model.linear import Linear
from lmstack.model.rope import apply_rope


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        d = config.hidden_size
        self.q_proj = Linear(d, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = Linear(d, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = Linear(d, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, d, bias=config.out_bias)
        self.dropout = config.dropout
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, cache_slots: torch.Tensor | None = None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d).

        mask: boolean (B, 1, T, S), True where a query may attend, or None for plain causal attention
        over the T tokens given. With a KV cache, keys/values are written at `cache_slots`, (T,) shared by
        the rows or (B, T) per row, and S is the cache length.
        prefix: keys and values (1, H_kv, P, D) every query attends to before the others (prompt / prefix
        tuning); the mask then covers P + S keys. Concatenated per call, so the decode session needs no
        reserved cache slots (and a copy of the cache per step is the cost).
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        decoding = self.kv_cache is not None and cache_slots is not None
        if decoding:
            k, v = self.kv_cache.update(cache_slots, k, v)  # (B, H_kv, S_max, D)
        if prefix is not None:
            pk, pv = (p.to(k.dtype).expand(k.shape[0], -1, -1, -1) for p in prefix)  # (B, H_kv, P, D)
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, H_kv, P + S, D)
        if decoding and T == 1 and mask is not None:
            y = single_query_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.num_kv_heads != self.num_heads,  # broadcast K/V heads instead of repeating them
            )  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query token per row (a decode step): q (B, H, 1, D), k/v (B, H_kv, S, D), mask
    (B|1, 1, 1, S) -> (B, H, 1, D).

    Written out rather than through SDPA: for a single query the CPU SDPA kernel's fixed cost per call is
    large next to this tiny product (README, Benchmarks), while torch.compile fuses the plain form into a
    few loops. The H / H_kv query heads that share a KV head are stacked as rows of one matmul, so K and V
    are read once per KV head.
    """
    B, H, _, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    q = q.reshape(B, H_kv, H // H_kv, D)  # (B, H_kv, G, D): heads h_kv*G .. h_kv*G+G-1 use KV head h_kv
    scores = (q @ k.transpose(-1, -2)) * D**-0.5  # (B, H_kv, G, S)
    scores = scores.masked_fill(~mask.view(mask.shape[0], 1, 1, S), float("-inf"))
    return (scores.softmax(-1) @ v).reshape(B, H, 1, D)  # (B, H, 1, D)
