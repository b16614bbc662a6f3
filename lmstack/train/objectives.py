"""Training objectives as pure functions: tensors (and a model) in, a scalar loss tensor out.

The engine calls an objective with the model and one micro-batch; the objective returns the mean
loss over that micro-batch. Later objectives (SFT with masked prompts, DPO, distillation) live
beside `causal_lm_loss` and reuse `cross_entropy`.

Shapes: B batch, T tokens, V vocab.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.model import Transformer

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """Next-token cross-entropy. logits (B, T, V), targets (B, T) int64 -> scalar.

    Positions whose target is `ignore_index` contribute nothing; "mean" divides by the number of
    remaining positions (NaN-free 0 when there are none). The loss is computed in fp32 even when
    the logits are bf16, because log-softmax over a large vocabulary loses too much precision in bf16.
    """
    _check_reduction(reduction)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on (B, T)")
    V = logits.shape[-1]
    flat_logits = logits.reshape(-1, V).float()  # (B*T, V)
    flat_targets = targets.reshape(-1)  # (B*T,)
    total = F.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index, reduction="sum")
    return _reduced(total, targets, ignore_index, reduction)


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _reduced(total: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """A summed loss as asked: itself, or divided by the kept targets (NaN-free 0 when there are none)."""
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                   ignore_index: int = IGNORE_INDEX, reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """The pretraining objective: `model(input_ids)` (B, T) -> logits (B, T, V), scored against targets (B, T).

    `targets` are the inputs shifted left by one (the loader does the shift), so position t predicts
    token t+1; set a target to `ignore_index` to leave it out (padding, prompt tokens). An lmstack
    Transformer scores its own head's output in chunks (`model(input_ids, targets=...)`), so the
    (B, T, V) logits are never held at once; any other model returns logits.
    """
    if not isinstance(getattr(model, "module", model), Transformer):  # DDP keeps the model as .module
        return cross_entropy(model(input_ids), targets, ignore_index=ignore_index, reduction=reduction)
    _check_reduction(reduction)
    if input_ids.shape != targets.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and targets {tuple(targets.shape)} disagree on (B, T)")
    total = model(input_ids, targets=targets, ignore_index=ignore_index)  # the head fused with the loss
    return _reduced(total, targets, ignore_index, reduction)


__all__ = ["IGNORE_INDEX", "causal_lm_loss", "cross_entropy"]
