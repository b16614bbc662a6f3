"""`Loss`: what every objective returns for one micro-batch.

An objective reports the loss *summed* over the items it scored and how many items that was (tokens
for language modelling and SFT, pairs for DPO, sequences for a reward model), never a mean. The
engine adds up totals and counts over every micro-batch of an optimizer step and over every rank, and
divides once: so a step's gradient is the mean over all the items of the step, the same whether its
batch is split into 1x8 or 8x1 micro-batches or over 2 ranks, and also when micro-batches score
different numbers of items (SFT's masked prompts, variable-length pairs). A mean per micro-batch
would weight a micro-batch of 3 scored tokens like one of 300.

The engine reports exp(validation loss) as a perplexity, which means something only for a token NLL. An
objective whose loss is something else (a label cross-entropy, a preference or policy loss) says so with
the attribute `loss_is_token_nll = False` (on its class, or on the function).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Loss:
    """One micro-batch's loss: `total` summed over `count` scored items, plus metrics summed the same way.

    total:   a scalar tensor (the one backward runs through)
    count:   the number of items scored (a scalar tensor or an int); 0 is allowed (nothing to score)
    metrics: extra per-item sums to log (e.g. "reward_accuracy": correct pairs), each logged as
             sum / count over the step; detached tensors or floats
    """

    total: torch.Tensor
    count: torch.Tensor | int
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)

    def mean(self) -> torch.Tensor:
        """total / count (0 when nothing was scored): the micro-batch's mean loss, for reporting."""
        count = torch.as_tensor(self.count, dtype=torch.float32, device=self.total.device)
        return self.total.float() / count.clamp(min=1)

    def scaled(self, factor: float) -> Loss:
        """The same loss with its total multiplied (e.g. to give an auxiliary term a weight)."""
        return Loss(self.total * factor, self.count, dict(self.metrics))

    def __add__(self, other: Loss) -> Loss:
        """Two losses over the same items (an objective term plus a regulariser): totals and metrics add,
        the count is this loss's."""
        metrics = dict(self.metrics)
        for name, value in other.metrics.items():
            metrics[name] = metrics.get(name, 0.0) + value
        return Loss(self.total + other.total, self.count, metrics)
