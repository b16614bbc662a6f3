"""The DPO family: preference losses on summed completion log-probabilities, as trl defines them.

With Δ = (log π - log π_ref)(chosen) - (log π - log π_ref)(rejected), the sequence log-probabilities being
sums over completion tokens:

    sigmoid   DPO                       -log σ(βΔ)
    hinge     SLiC                      relu(1 - βΔ)
    ipo       IPO (length-normalised,   ((Δ_c/|y_c| - Δ_r/|y_r|) - 1/(2β))², Δ_c = (log π - log π_ref)(chosen)
              as trl)
    robust    conservative DPO, ε =     (-(1-ε) log σ(βΔ) + ε log σ(-βΔ)) / (1 - 2ε)
              label_smoothing
    kto       unpaired (KTO)            desirable 1 - σ(β(r - z)), undesirable 1 - σ(β(z - r)), r = log π/π_ref,
                                        z = max(0, mean KL estimate over mismatched pairs), no gradient through z
    simpo     reference-free            -(1-ε) log σ(βm) - ε log σ(-βm), m = avg log π(c) - avg log π(r) - γ/β
    orpo      reference-free            NLL(chosen) - β log σ(log odds(c) - log odds(r)),
                                        log odds(y) = avg log π(y) - log(1 - exp(avg log π(y)))

Implicit rewards (logged) are β(log π - log π_ref), for simpo and orpo β·avg log π, as in trl.

The objective returns the loss SUMMED over pairs (KTO: examples) and their count (lmstack Loss), with
the logged metrics summed over the same pairs: reward_accuracy (pairs with chosen reward > rejected, as
trl counts it), reward_ties (equal rewards: every pair at the first step, where policy = reference), reward_margin, reward_chosen / reward_rejected, logps_chosen / logps_rejected.

`sft_weight` α adds α · NLL(chosen) to each pair's loss (RPO, Pang et al. 2024; trl's loss_type ["sigmoid",
"sft"] with loss_weights [1, α]): DPO constrains only the chosen-minus-rejected difference, so a policy may
lower both answers' likelihood at once (likelihood displacement); the NLL term holds the chosen one up.

One difference from trl, on purpose: ORPO's NLL term (and the sft term) is each pair's mean over its chosen
tokens (summed over pairs like every other term), where trl takes one mean over all chosen tokens of the batch,
which would make the gradient depend on how a step is split into micro-batches. The two agree when the
chosen sequences have equal lengths (the trl parity test uses such a batch). `orpo_nll: all` also
scores the prompt tokens, as trl does; the default `completion` scores the answer only, as the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import ConfigError
from lmstack.train.objectives.lm import IGNORE_INDEX
from lmstack.train.objectives.logprobs import completion_lengths, token_logprobs
from lmstack.train.objectives.loss import Loss
from lmstack.train.reference import Reference

PreferenceLoss = Literal["sigmoid", "hinge", "ipo", "robust", "kto", "simpo", "orpo"]
REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class PreferenceConfig:
    """The `dpo:` section of an alignment config."""

    loss: PreferenceLoss = "sigmoid"
    beta: float = 0.1  # the KL strength β (IPO: τ; ORPO: the odds-ratio weight λ)
    label_smoothing: float = 0.0  # ε: robust DPO / conservative SimPO, the assumed fraction of flipped labels
    simpo_gamma: float = 0.5  # SimPO's target reward margin γ
    orpo_nll: Literal["completion", "all"] = "completion"  # ORPO's NLL over the answer, or prompt and answer (trl)
    desirable_weight: float = 1.0  # KTO: weight of desirable examples
    undesirable_weight: float = 1.0  # KTO: weight of undesirable examples
    precompute_reference: bool = False  # score the reference once before training, cached on disk
    sft_weight: float = 0.0  # α: + α · NLL(chosen) per pair (RPO; trl's loss_type [sigmoid, sft]); 0 = off

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ConfigError("dpo.desirable_weight and dpo.undesirable_weight must be positive")
        if self.sft_weight < 0:
            raise ConfigError(f"dpo.sft_weight must be >= 0, got {self.sft_weight}")
        if self.sft_weight and self.loss in ("kto", "orpo"):
            raise ConfigError(f"dpo.sft_weight is for the pairwise losses; {self.loss} has its own NLL / KL terms: "
                              "set dpo.sft_weight: 0")

    @property
    def uses_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, without cancellation (the branch at -log 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_losses(cfg: PreferenceConfig, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None,
                chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards (B,) each, from summed log-probabilities (B,) and completion
    lengths (B,). The ORPO NLL term is not included (it needs token log-probabilities: see the objective)."""
    beta, eps = cfg.beta, cfg.label_smoothing
    if cfg.loss in REFERENCE_FREE:
        avg_c = chosen_logps / chosen_lengths.clamp(min=1)
        avg_r = rejected_logps / rejected_lengths.clamp(min=1)
        if cfg.loss == "simpo":
            m = (avg_c - avg_r) - cfg.simpo_gamma / beta
            losses = -F.logsigmoid(beta * m) * (1 - eps) - F.logsigmoid(-beta * m) * eps
        else:
            avg_c, avg_r = avg_c.float(), avg_r.float()
            log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
            losses = -beta * F.logsigmoid(log_odds)
        return losses, beta * avg_c.detach(), beta * avg_r.detach()

    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if cfg.loss == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif cfg.loss == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif cfg.loss == "ipo":
        normalised = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (normalised - 1 / (2 * beta)) ** 2
    elif cfg.loss == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    else:
        raise ConfigError(f"dpo.loss {cfg.loss!r} is not a pairwise loss (kto trains on unpaired examples)")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kto_losses(cfg: PreferenceConfig, logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor,
               kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO per-example losses (B,), implicit rewards (B,) and the reference point z (a scalar, no gradient).

    z is the mean of log π - log π_ref over the batch's mismatched (prompt, completion) pairs, clamped at 0.
    """
    z = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    ratio = logps - ref_logps
    desirable = cfg.desirable_weight * (1 - torch.sigmoid(cfg.beta * (ratio - z)))
    undesirable = cfg.undesirable_weight * (1 - torch.sigmoid(cfg.beta * (z - ratio)))
    losses = torch.where(labels, desirable, undesirable)
    return losses, cfg.beta * ratio.detach(), z


def _all_token_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token targets over every real token (prompt included), IGNORE_INDEX on padding."""
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = torch.where(attention_mask[:, 1:].bool(), input_ids[:, 1:], IGNORE_INDEX)
    return targets


class PreferenceObjective:
    """objective(model, batch) -> Loss for the pairwise losses (collate_pairs batches) and KTO (collate_unpaired).

    The reference log-probabilities come from the batch ("ref_logps" (B, R), precomputed) or from
    `reference`; simpo and orpo use none.
    """

    loss_is_token_nll = False  # the engine logs no perplexity for it

    def __init__(self, cfg: PreferenceConfig, reference: Reference | None = None):
        if cfg.uses_reference and reference is None and not cfg.precompute_reference:
            raise ConfigError(f"dpo.loss {cfg.loss!r} needs a reference model")
        self.cfg, self.reference = cfg, reference

    def _reference_logps(self, model: nn.Module, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        ids, mask, targets = (batch[prefix + k] for k in ("input_ids", "attention_mask", "targets"))
        return self.reference.token_logprobs(model, ids, mask, targets).sum(-1)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Loss:
        if self.cfg.loss == "kto":
            return self._kto(model, batch)
        cfg = self.cfg
        ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["targets"]
        B = ids.shape[0] // 2
        lengths = completion_lengths(targets)  # (2B,)
        if cfg.loss == "orpo" and cfg.orpo_nll == "all":
            scored = torch.cat([_all_token_targets(ids[:B], mask[:B]), targets[B:]])
            token_lp, _ = token_logprobs(model, ids, mask, scored)  # (2B, T)
            completion = (targets != IGNORE_INDEX).float()
            logps = (token_lp * completion).sum(-1)
            nll_tokens, nll_counts = token_lp[:B].sum(-1), (scored[:B] != IGNORE_INDEX).sum(-1)
        else:
            token_lp, _ = token_logprobs(model, ids, mask, targets)
            logps = token_lp.sum(-1)  # (2B,)
            nll_tokens, nll_counts = logps[:B], lengths[:B]
        ref_c = ref_r = None
        if cfg.uses_reference:
            if "ref_logps" in batch:
                ref_c, ref_r = batch["ref_logps"][:, 0], batch["ref_logps"][:, 1]
            else:
                ref = self._reference_logps(model, batch)
                ref_c, ref_r = ref[:B], ref[B:]
        losses, chosen_rewards, rejected_rewards = pair_losses(cfg, logps[:B], logps[B:], ref_c, ref_r,
                                                               lengths[:B], lengths[B:])
        metrics = _pair_metrics(chosen_rewards, rejected_rewards, logps[:B].detach(), logps[B:].detach())
        if cfg.loss == "orpo":
            nll = -nll_tokens / nll_counts.clamp(min=1)  # (B,) each pair's mean NLL over its chosen tokens
            metrics["nll"] = nll.detach().sum()
            metrics["odds_ratio_loss"] = losses.detach().sum()
            losses = losses + nll
        elif cfg.sft_weight:  # RPO: the chosen answers' likelihood anchored (DPO alone may lower it: see above)
            nll = -nll_tokens / nll_counts.clamp(min=1)  # (B,)
            metrics["nll"] = nll.detach().sum()
            losses = losses + cfg.sft_weight * nll
        return Loss(losses.sum(), B, metrics)

    def _kto(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Loss:
        logp, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["targets"])
        logps = logp.sum(-1)  # (B,)
        with torch.no_grad():  # the reference point takes no gradient (as in trl)
            kl_logps, _ = token_logprobs(model, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_targets"])
            kl_logps = kl_logps.sum(-1)
        if "ref_logps" in batch:
            ref_logps, ref_kl = batch["ref_logps"][:, 0], batch["ref_logps"][:, 1]
        else:
            ref_logps, ref_kl = self._reference_logps(model, batch), self._reference_logps(model, batch, "kl_")
        labels = batch["labels"].bool()
        losses, rewards, z = kto_losses(self.cfg, logps, ref_logps, labels, kl_logps, ref_kl)
        B = logps.shape[0]
        metrics = {"kl": z * B, "reward_desirable": (rewards * labels).sum(),
                   "reward_undesirable": (rewards * ~labels).sum(), "desirable": labels.sum().float()}
        return Loss(losses.sum(), B, metrics)


def _pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                  rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over the pairs (the engine logs sum / pairs)."""
    return {"reward_accuracy": (chosen_rewards > rejected_rewards).float().sum(),
            "reward_ties": (chosen_rewards == rejected_rewards).float().sum(),
            "reward_margin": (chosen_rewards - rejected_rewards).sum(),
            "reward_chosen": chosen_rewards.sum(), "reward_rejected": rejected_rewards.sum(),
            "logps_chosen": chosen_logps.sum(), "logps_rejected": rejected_logps.sum()}


__all__ = ["PreferenceConfig", "PreferenceObjective", "kto_losses", "log1mexp", "pair_losses"]
