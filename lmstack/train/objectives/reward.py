"""Reward-model training: the Bradley-Terry loss on the scores of the chosen and rejected sequences.

    loss = -log σ(r_chosen - r_rejected - margin)  [+ c · (r_chosen + r_rejected)²]

`margin` is the pair's own margin when the data gives one (e.g. a rating difference), else 0; the optional
centering term (trl's center_rewards_coefficient, Eisenstein et al. 2023) keeps the scores near zero.
Summed over pairs with the pair count (lmstack Loss); logged: accuracy (pairs with r_chosen > r_rejected),
margin, and the mean chosen / rejected scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import ConfigError
from lmstack.train.objectives.loss import Loss


@dataclass
class RewardConfig:
    """The `rm:` section of an alignment config."""

    use_margin: bool = True  # subtract the pair's "margin" field when the data has one
    center_coef: float | None = None  # weight of the (r_chosen + r_rejected)² centering term; null = off

    def __post_init__(self) -> None:
        if self.center_coef is not None and self.center_coef < 0:
            raise ConfigError(f"rm.center_coef must be >= 0 or null, got {self.center_coef}")


def bradley_terry_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                         center_coef: float | None = None) -> torch.Tensor:
    """Per-pair losses (B,) from the scores (B,) of the chosen and rejected sequences."""
    diff = chosen - rejected if margin is None else chosen - rejected - margin
    losses = -F.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (chosen + rejected) ** 2
    return losses


class RewardObjective:
    """objective(model, batch) -> Loss for a ScoreModel on collate_pairs batches ([chosen rows; rejected rows])."""

    loss_is_token_nll = False  # the engine logs no perplexity for it

    def __init__(self, cfg: RewardConfig | None = None):
        self.cfg = cfg or RewardConfig()

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Loss:
        scores = model(batch["input_ids"], batch["attention_mask"])  # (2B,)
        B = scores.shape[0] // 2
        chosen, rejected = scores[:B], scores[B:]
        margin = batch.get("margin") if self.cfg.use_margin else None
        losses = bradley_terry_losses(chosen, rejected, margin, self.cfg.center_coef)
        chosen, rejected = chosen.detach(), rejected.detach()
        metrics = {"accuracy": (chosen > rejected).float().sum(), "margin": (chosen - rejected).sum(),
                   "reward_chosen": chosen.sum(), "reward_rejected": rejected.sum()}
        return Loss(losses.sum(), B, metrics)


__all__ = ["RewardConfig", "RewardObjective", "bradley_terry_losses"]
