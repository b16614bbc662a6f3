"""T5 span-corruption pretraining: the decoder's cross-entropy over the target tokens (sentinels, the hidden
spans, eos), summed; the count is the target tokens that are not padding."""

from __future__ import annotations

import torch
from torch import nn

from lmstack.train.objectives.loss import Loss

IGNORE_INDEX = -100


def span_corruption_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> Loss:
    """batch: input_ids, attention_mask (B, S), labels (B, T) -> Loss over the labelled target tokens."""
    labels = batch["labels"]
    total = model(batch["input_ids"], batch["attention_mask"], targets=labels, ignore_index=IGNORE_INDEX)
    return Loss(total, (labels != IGNORE_INDEX).sum())


__all__ = ["span_corruption_loss"]
