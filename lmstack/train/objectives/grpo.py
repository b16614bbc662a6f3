"""GRPO, Dr. GRPO and RLOO: G samples per prompt, advantages relative to the group, a clipped token loss.

Advantages, per group of G samples of one prompt with rewards r_1..r_G (a dropped sample, whose reward
function raised or gave NaN, is left out of its group's statistics and gets advantage 0):

    grpo      A_i = (r_i - mean(r)) / (std(r) + 1e-4)      std with Bessel's correction, as trl
    dr_grpo   A_i = r_i - mean(r)                          (Liu et al. 2025: no division by the std)
    rloo      A_i = r_i - (Σ_j r_j - r_i) / (G - 1)        the leave-one-out baseline (Ahmadian et al. 2024)

Token loss, with ρ_t = π(y_t) / π_old(y_t) (π_old: the policy that sampled; ρ = 1 at the first update):

    ℓ_t = -min(ρ_t A, clip(ρ_t, 1 - ε, 1 + ε_high) A) + β k3_t,   k3_t = π_ref/π - log(π_ref/π) - 1

Aggregation (`loss_aggregation`), as the sum over items plus their count (lmstack Loss):

    sequence  each sequence's mean over its tokens, summed over sequences, counted in sequences (GRPO)
    token     summed over every completion token, counted in tokens (DAPO)
    fixed     summed over tokens and divided by max_new_tokens, counted in sequences (Dr. GRPO's G·L_max)

Logged (aggregated the same way): the KL to the reference, the clip fraction and the entropy; and the
rollout's mean reward, the share of samples dropped, and the generation time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from lmstack.errors import ConfigError
from lmstack.train.objectives.lm import IGNORE_INDEX
from lmstack.train.objectives.logprobs import token_logprobs
from lmstack.train.objectives.loss import Loss
from lmstack.train.objectives.ppo import spread_stats

AdvantageKind = Literal["grpo", "dr_grpo", "rloo"]
Aggregation = Literal["sequence", "token", "fixed"]


@dataclass
class GRPOConfig:
    """The `grpo:` section of an alignment config (`lmstack align rloo` sets advantage: rloo)."""

    advantage: AdvantageKind = "grpo"
    group_size: int = 8  # G: samples per prompt
    beta: float = 0.04  # weight of the k3 KL to the reference (0: no reference model at all)
    epsilon: float = 0.2  # lower clip ε
    epsilon_high: float | None = None  # upper clip (DAPO's clip-higher); null = epsilon
    loss_aggregation: Aggregation = "sequence"
    reward_fns: list[str] = field(default_factory=list)  # lmstack.align.rewards names, or module:function
    reward_weights: list[float] | None = None  # one per reward function; null = all 1

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ConfigError(f"grpo.group_size must be >= 2 (advantages are relative to the group), got "
                              f"{self.group_size}")
        if self.beta < 0 or self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ConfigError("grpo.beta must be >= 0 and grpo.epsilon / epsilon_high positive")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_fns):
            raise ConfigError(f"grpo.reward_weights has {len(self.reward_weights)} entries for "
                              f"{len(self.reward_fns)} reward functions")


def group_advantages(rewards: torch.Tensor, group_size: int, kind: AdvantageKind = "grpo") -> torch.Tensor:
    """(N,) rewards, N = prompts × G in group order, NaN for dropped samples -> (N,) advantages (0 for dropped)."""
    grouped = rewards.view(-1, group_size)  # (P, G)
    valid = ~torch.isnan(grouped)
    n = valid.sum(dim=1, keepdim=True)  # (P, 1)
    total = torch.nansum(grouped, dim=1, keepdim=True)
    mean = total / n.clamp(min=1)
    if kind == "rloo":
        baseline = (total - grouped) / (n - 1)  # NaN / inf where a group has < 2 valid samples: zeroed below
        advantages = grouped - baseline
    else:
        advantages = grouped - mean
        if kind == "grpo":
            var = torch.nansum((grouped - mean) ** 2, dim=1, keepdim=True) / (n - 1).clamp(min=1)
            advantages = advantages / (var.sqrt() + 1e-4)
        elif kind != "dr_grpo":
            raise ConfigError(f"grpo.advantage must be grpo, dr_grpo or rloo, got {kind!r}")
    advantages = torch.where(valid & (n >= 2), advantages, torch.zeros_like(advantages))
    return torch.nan_to_num(advantages, nan=0.0, posinf=0.0, neginf=0.0).view(-1)


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(π || π_ref) per token: ρ - log ρ - 1, ρ = π_ref / π (never negative)."""
    log_rho = ref_logp - logp
    return torch.exp(log_rho) - log_rho - 1


def grpo_token_losses(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                      advantages: torch.Tensor, epsilon: float, epsilon_high: float, beta: float
                      ) -> dict[str, torch.Tensor]:
    """Per-token terms (B, T): the loss ℓ_t, the k3 KL (0 without a reference), and the 0/1 clipped flag.
    advantages (B,) broadcast over each row's tokens."""
    A = advantages[:, None].to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.minimum(ratio * A, clipped_ratio * A)
    kl = k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta and ref_logp is not None:
        loss = loss + beta * kl
    clipped = ((ratio < 1 - epsilon) & (A < 0)) | ((ratio > 1 + epsilon_high) & (A > 0))
    return {"loss": loss, "kl": kl, "clipped": clipped.to(logp.dtype)}


class GRPOObjective:
    """objective(model, batch) -> Loss on rollout batches (lmstack.train.rollout) for grpo / dr_grpo / rloo."""

    loss_is_token_nll = False  # the engine logs no perplexity for it

    def __init__(self, cfg: GRPOConfig, max_new_tokens: int):
        self.cfg, self.max_new_tokens = cfg, max_new_tokens

    def aggregate(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sum of `per_token` (B, T) over the batch's items in the configured aggregation (see the module doc)."""
        if self.cfg.loss_aggregation == "sequence":
            return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()
        total = (per_token * mask).sum()
        return total / self.max_new_tokens if self.cfg.loss_aggregation == "fixed" else total

    def count(self, mask: torch.Tensor) -> torch.Tensor:
        return mask.sum() if self.cfg.loss_aggregation == "token" else (mask.sum(-1) > 0).sum()

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Loss:
        targets = batch["targets"]
        logp, entropy = token_logprobs(model, batch["input_ids"], batch["attention_mask"], targets, with_entropy=True)
        mask = (targets != IGNORE_INDEX).to(logp.dtype)  # dropped samples have no targets at all
        old = batch.get("old_logprobs")
        cfg = self.cfg
        terms = grpo_token_losses(logp, logp.detach() if old is None else old, batch.get("ref_logprobs"),
                                  batch["advantages"], cfg.epsilon,
                                  cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high, cfg.beta)
        count = self.count(mask)
        metrics = {"kl": self.aggregate(terms["kl"].detach(), mask),
                   "clip_fraction": self.aggregate(terms["clipped"], mask),
                   "entropy": self.aggregate(entropy.detach(), mask)}
        metrics.update(spread_stats(batch.get("stats"), count))
        return Loss(self.aggregate(terms["loss"], mask), count, metrics)


__all__ = ["GRPOConfig", "GRPOObjective", "group_advantages", "grpo_token_losses", "k3"]
