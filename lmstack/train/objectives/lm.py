"""Language-modelling objectives: next-token cross-entropy, summed over the scored tokens.

Shapes: B batch, T tokens, V vocab.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.train.objectives.loss import Loss

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """Next-token cross-entropy. logits (B, T, V), targets (B, T) int64 -> scalar.

    Positions whose target is `ignore_index` contribute nothing; "mean" divides by the number of
    remaining positions (NaN-free 0 when there are none). The loss is computed in fp32 even when
    the logits are bf16, because log-softmax over a large vocabulary loses too much precision in bf16.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on (B, T)")
    V = logits.shape[-1]
    flat_logits = logits.reshape(-1, V).float()  # (B*T, V)
    flat_targets = targets.reshape(-1)  # (B*T,)
    total = F.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                   ignore_index: int = IGNORE_INDEX) -> Loss:
    """The language-modelling objective: input_ids (B, T) scored against targets (B, T) -> Loss over the tokens.

    `targets` are the inputs shifted left by one (the loader does the shift), so position t predicts
    token t+1; set a target to `ignore_index` to leave it out (padding, prompt tokens): the count is the
    number of targets that are not. The model computes the summed loss itself (`model(ids,
    targets=...)`, lmstack.model.protocol.CausalLM), which lets a Transformer run its head and the loss
    together in chunks, so the (B, T, V) logits never exist at once.
    """
    if input_ids.shape != targets.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and targets {tuple(targets.shape)} disagree on (B, T)")
    total = model(input_ids, targets=targets, ignore_index=ignore_index)
    return Loss(total, (targets != ignore_index).sum())


__all__ = ["IGNORE_INDEX", "causal_lm_loss", "cross_entropy"]
