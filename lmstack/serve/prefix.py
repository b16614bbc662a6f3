"""The prefix cache: keys and values of shared prompt prefixes (a chat's system prompt), kept so that a new
request starting with one copies them into its row instead of computing them again.

An entry is the token ids of the prefix and, per layer, its (k, v) slots (DecodeSession.read_slots). Entries
are few (a configured count, least recently used dropped first) and live outside the pool's rows: the pool
is what requests hold, the cache is a fixed extra of `entries x prefix length` slots.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]
MIN_PREFIX_TOKENS = 16  # a shorter prefix costs about as much to compute as to copy


class PrefixCache:
    def __init__(self, entries: int):
        self.entries = entries
        self._store: OrderedDict[tuple[int, ...], KV] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def lookup(self, prompt: list[int]) -> KV | None:
        """The longest cached prefix of `prompt` that leaves at least one token to compute, or None."""
        best = None
        for ids in self._store:
            if len(ids) < len(prompt) and (best is None or len(ids) > len(best)) and tuple(prompt[:len(ids)]) == ids:
                best = ids
        if best is None:
            return None
        self._store.move_to_end(best)
        return self._store[best]

    def wants(self, prefix: list[int]) -> bool:
        """Whether `prefix` is worth storing and not stored yet."""
        return self.entries > 0 and len(prefix) >= MIN_PREFIX_TOKENS and tuple(prefix) not in self._store

    def insert(self, prefix: list[int], kv: KV) -> None:
        self._store[tuple(prefix)] = kv
        while len(self._store) > self.entries:
            self._store.popitem(last=False)
