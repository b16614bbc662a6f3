"""Supervised fine-tuning's objective: next-token cross-entropy over the assistant tokens only.

It is `causal_lm_loss` with two more inputs: the batch's attention mask (padding, or a segment id per
token when several samples share a packed row) and position ids (restarting at each packed sample).
Targets outside the assistant's output are IGNORE_INDEX, so the count is the number of trained tokens
and the engine's division makes each step the mean over exactly those (lmstack.data.sft builds the batch).
"""

from __future__ import annotations

import torch
from torch import nn

from lmstack.train.objectives.lm import IGNORE_INDEX
from lmstack.train.objectives.loss import Loss


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> Loss:
    """batch: input_ids, targets, attention_mask, position_ids, each (B, T) -> Loss summed over the trained tokens."""
    targets = batch["targets"]
    total = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                  targets=targets, ignore_index=IGNORE_INDEX)
    return Loss(total, (targets != IGNORE_INDEX).sum())


__all__ = ["sft_loss"]
