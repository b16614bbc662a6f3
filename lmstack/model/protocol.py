"""What training, generation, evaluation and serving need from a language model: the `CausalLM` protocol.

The `Transformer` provides it, and so does anything built from one without subclassing it: a model
whose leaf linears were swapped for LoRA or quantized ones is still a Transformer; a reward or value
model wraps one and adds its own head. Code that drives a model (objectives, the decode session, the
evaluator, the server) calls only these members, never `isinstance(model, Transformer)`.

Shapes: B batch, T tokens, S cache slots, d width, V vocabulary.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from lmstack.config import ModelConfig
from lmstack.model.kv_cache import KVCache


@runtime_checkable
class CausalLM(Protocol):
    """A decoder-only language model with a static KV cache."""

    config: ModelConfig  # vocab_size, max_seq_len, eos/pad ids, ...

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, cache_slots: torch.Tensor | None = None,
                 targets: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V); with `targets` (B, T), the cross-entropy summed over the
        targets that are not `ignore_index` instead (a scalar; the model may fuse its head with the loss)."""
        ...

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None,
                      cache_slots: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> the final hidden states (B, T, d), before the head. attention_mask: (B, T) 1/0 or
        segment ids, or a boolean (B, 1, T, S) pattern used as given (then with explicit position_ids)."""
        ...

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., d) -> logits (..., V)."""
        ...

    def make_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> list[KVCache]:
        """A static KV cache per layer: `max_len` slots for `batch_size` rows."""
        ...

    def kv_caches(self) -> list[KVCache | None]:
        """The installed per-layer caches."""
        ...

    def use_caches(self, caches: list[KVCache | None]) -> None:
        """Install per-layer caches (from `make_cache`, or an earlier `kv_caches()`)."""
        ...


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (`.module`) or `torch.compile` (`._orig_mod`) wrapper."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            return model


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live (its first parameter's device)."""
    return next(model.parameters()).device


__all__ = ["CausalLM", "model_device", "unwrap"]
