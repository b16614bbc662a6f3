"""PPO for language models (InstructGPT; trl v0's PPOTrainer): rewards, GAE, and the clipped losses.

At rollout time (lmstack.train.rollout), per completion token t of each sampled sequence:

    kl_t     = log π_old(y_t) - log π_ref(y_t)                       (k1), or
               (ρ - 1) - log ρ,  ρ = π_ref(y_t) / π_old(y_t)         (k3: unbiased and never negative)
    r_t      = -kl_coef · kl_t, plus the reward model's score (or the reward functions') at the last token
    δ_t      = r_t + γ V(s_{t+1}) - V(s_t)   (V = 0 after the last token)
    A_t      = δ_t + γλ A_{t+1};  returns R_t = A_t + V(s_t);  A whitened over the rollout's tokens

At train time, over several epochs of minibatches of that rollout:

    ratio    = π(y_t) / π_old(y_t)
    L_pg     = max(-A_t · ratio, -A_t · clip(ratio, 1 - ε, 1 + ε))
    L_vf     = ½ max((V - R)², (V_old + clip(V - V_old, -ε_v, ε_v) - R)²)
    loss     = L_pg + vf_coef · L_vf                      summed over completion tokens, counted in tokens

The KL coefficient is fixed or adaptive (Ziegler et al. 2019): kl_coef *= 1 + clip(KL / target - 1, ±0.2) ·
n / horizon after each rollout of n sequences. A KL that turns negative on average is the known sign of a
broken sampler or reference (trl #351, #1857): k1 can be negative per token, its mean should not be.
Logged: pg and value losses, clip fraction, value clip fraction, entropy, approximate KL to the rollout
policy, and the rollout's mean score, KL, KL coefficient and value explained variance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from lmstack.errors import ConfigError
from lmstack.train.objectives.lm import IGNORE_INDEX
from lmstack.train.objectives.loss import Loss

KLEstimator = Literal["k1", "k3"]


@dataclass
class PPOConfig:
    """The `ppo:` section of an alignment config (defaults: trl v0 / InstructGPT)."""

    kl_coef: float = 0.05  # initial (or fixed) coefficient of the per-token KL penalty
    kl_estimator: KLEstimator = "k1"
    adaptive_kl: bool = False  # adapt kl_coef towards kl_target
    kl_target: float = 6.0  # target KL per sequence (nats) for the adaptive controller
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    reward_model: str | None = None  # a reward-model directory (sequence classification); or:
    reward_fns: list[str] = field(default_factory=list)  # reward functions by name (lmstack.align.rewards)

    def __post_init__(self) -> None:
        if self.kl_coef < 0:
            raise ConfigError(f"ppo.kl_coef must be >= 0, got {self.kl_coef}")
        for name in ("cliprange", "cliprange_value"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ppo.{name} must be positive, got {getattr(self, name)}")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ConfigError(f"ppo.gamma and ppo.lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.kl_horizon <= 0 or self.kl_target <= 0:
            raise ConfigError("ppo.kl_horizon and ppo.kl_target must be positive")


# ------------------------------------------------------------------------------------------- rollout side
def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token KL(π || π_ref) estimates from the sampled tokens' log-probabilities (same shapes)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_rho = ref_logp - logp
        return torch.exp(log_rho) - 1 - log_rho
    raise ConfigError(f"kl_estimator must be k1 or k3, got {estimator!r}")


def last_scored_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) completion mask -> (B,) index of each row's last completion position."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask.bool()).argmax(dim=-1)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -kl_coef · kl_t on completion positions, plus each sequence's score (B,) at its last one. (B, T)."""
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_scored_index(mask)] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's completion positions -> (advantages, returns) (B, T).

    `mask` marks one contiguous run of completion positions per row; the value after the last is 0 (the
    episode ends). Positions outside the mask get 0.
    """
    mask = mask.to(values.dtype)
    B, T = rewards.shape
    advantages = torch.zeros_like(values)
    running = torch.zeros(B, dtype=values.dtype, device=values.device)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        next_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running * next_mask) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased (n - 1) variance over the masked entries, as trl v0."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    centred = (x - masked_mean(x, mask)) * mask
    return (centred ** 2).sum() / (n - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries; 0 outside the mask."""
    return (x - masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + 1e-8) * mask.to(x.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over the completion tokens (1 = perfect value predictions, <= 0 = none)."""
    var_returns = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var_returns) if var_returns > 0 else float("nan")


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller: move kl_coef so the per-sequence KL approaches `target`."""

    def __init__(self, value: float, target: float, horizon: int):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


# ------------------------------------------------------------------------------------------- train side
def ppo_token_losses(logp: torch.Tensor, old_logp: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor,
                     advantages: torch.Tensor, returns: torch.Tensor, cliprange: float, cliprange_value: float
                     ) -> dict[str, torch.Tensor]:
    """Per-token PPO terms (B, T): pg, vf, and the 0/1 flags pg_clipped / vf_clipped (trl v0's definitions)."""
    ratio = torch.exp(logp - old_logp)
    pg_plain = -advantages * ratio
    pg_clip = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_plain = (values - returns) ** 2
    vf_clip = (values_clipped - returns) ** 2
    return {"pg": torch.maximum(pg_plain, pg_clip), "vf": 0.5 * torch.maximum(vf_plain, vf_clip),
            "pg_clipped": (pg_clip > pg_plain).to(logp.dtype), "vf_clipped": (vf_clip > vf_plain).to(logp.dtype),
            "approx_kl": 0.5 * (logp - old_logp) ** 2}


def spread_stats(stats: dict[str, torch.Tensor] | None, count: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rollout-level figures (one value for the whole rollout) as metric sums: the engine logs sum / count
    over the step, and every micro-batch of a step comes from the same rollout, so it logs the value itself."""
    return {k: v.detach().float() * count for k, v in (stats or {}).items()}


class PPOObjective:
    """objective(model, batch) -> Loss for a ValueHeadModel on rollout batches (lmstack.train.rollout)."""

    loss_is_token_nll = False  # the engine logs no perplexity for it

    def __init__(self, cfg: PPOConfig):
        self.cfg = cfg

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Loss:
        targets = batch["targets"]
        logp, entropy, values = model(batch["input_ids"], batch["attention_mask"], targets)
        mask = (targets != IGNORE_INDEX).to(logp.dtype)
        terms = ppo_token_losses(logp, batch["old_logprobs"], values, batch["old_values"], batch["advantages"],
                                 batch["returns"], self.cfg.cliprange, self.cfg.cliprange_value)
        per_token = terms["pg"] + self.cfg.vf_coef * terms["vf"]
        count = mask.sum()
        metrics = {name: (terms[key].detach() * mask).sum() for name, key in
                   (("pg_loss", "pg"), ("value_loss", "vf"), ("clip_fraction", "pg_clipped"),
                    ("value_clip_fraction", "vf_clipped"), ("approx_kl", "approx_kl"))}
        metrics["entropy"] = (entropy.detach() * mask).sum()
        metrics.update(spread_stats(batch.get("stats"), count))
        return Loss((per_token * mask).sum(), count, metrics)


__all__ = ["AdaptiveKLController", "PPOConfig", "PPOObjective", "explained_variance", "gae", "kl_estimate",
           "masked_mean", "masked_var", "masked_whiten", "ppo_token_losses", "spread_stats", "token_rewards"]
