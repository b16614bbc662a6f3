"""Sequence classification (an encoder's pooled [CLS] state -> labels): cross-entropy summed over the rows.

The items are the rows; metrics: accuracy. For fine-tuning an Encoder (full or with adapters on its
`query` / `value` linears) through the engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.model.protocol import unwrap
from lmstack.train.objectives.loss import Loss


def sequence_classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> Loss:
    """batch: input_ids, attention_mask (B, T), optional token_type_ids (B, T), labels (B,) -> Loss over the rows."""
    logits = unwrap(model).classify(batch["input_ids"], batch.get("attention_mask"),
                                    batch.get("token_type_ids")).float()  # (B, num_labels)
    labels = batch["labels"]
    total = F.cross_entropy(logits, labels, reduction="sum")
    return Loss(total, labels.numel(), {"accuracy": (logits.argmax(-1) == labels).sum().float()})


sequence_classification_loss.loss_is_token_nll = False  # a label cross-entropy: the engine logs no perplexity


__all__ = ["sequence_classification_loss"]
