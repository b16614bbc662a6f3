"""A preallocated, static key/value cache: fixed shapes so one compiled decode step serves every position."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Keys and values for one attention layer, (B, H_kv, S_max, D) each, written in place by slot index."""

    def __init__(self, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows [start, stop) of this one that shares its memory (a view, not a copy): a prefill
        of only those rows runs on it and writes straight into this cache."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[start:stop], persistent=False)
        view.register_buffer("v", self.v[start:stop], persistent=False)
        return view

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, D) at cache slots (T,) shared by every row, or (B, T), each row its own;
        return the whole cache (B, H_kv, S_max, D)."""
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if slots.dim() == 1:
            self.k.index_copy_(2, slots, k)
            self.v.index_copy_(2, slots, v)
        else:
            index = slots[:, None, :, None].expand_as(k)  # (B, H_kv, T, D): a view, nothing is copied
            self.k.scatter_(2, index, k)
            self.v.scatter_(2, index, v)
        return self.k, self.v
