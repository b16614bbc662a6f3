"""Masked-language-model pretraining (BERT): masked-token cross-entropy, optionally plus next-sentence prediction.

The items are the masked positions: `total` is the cross-entropy summed over them, `count` how many
there are (so the engine's per-step division gives the mean over every masked token of the step). NSP
is one decision per row; BERT adds its mean to the MLM mean, so it enters the total as the batch's NSP
mean times the masked count (after the engine's division: the NSP mean, whatever the micro-batch split).
Metrics: mlm_loss, mlm_accuracy (per masked token), nsp_loss, nsp_accuracy (per row).

Shapes: B rows, T tokens, M masked positions, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.model.protocol import unwrap
from lmstack.train.objectives.loss import Loss

IGNORE_INDEX = -100


def mlm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> Loss:
    """batch: input_ids, attention_mask, token_type_ids, labels (B, T) [+ next_sentence_label (B,)] -> Loss."""
    encoder = unwrap(model)
    hidden = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])  # (B, T, d)
    labels = batch["labels"]
    masked = labels != IGNORE_INDEX  # (B, T)
    logits = encoder.mlm_logits(hidden[masked]).float()  # (M, V): the head runs on the masked positions only
    targets = labels[masked]
    total = F.cross_entropy(logits, targets, reduction="sum")
    count = masked.sum()
    metrics = {"mlm_loss": total.detach(), "mlm_accuracy": (logits.argmax(-1) == targets).sum().float()}
    if "next_sentence_label" in batch:
        nsp_logits = encoder.nsp_logits(hidden).float()  # (B, 2)
        nsp_labels = batch["next_sentence_label"]
        nsp = F.cross_entropy(nsp_logits, nsp_labels)  # mean over the rows
        weight = count.float()
        total = total + nsp * weight
        metrics["nsp_loss"] = nsp.detach() * weight
        metrics["nsp_accuracy"] = (nsp_logits.argmax(-1) == nsp_labels).float().mean() * weight
    return Loss(total, count, metrics)


__all__ = ["mlm_loss"]
