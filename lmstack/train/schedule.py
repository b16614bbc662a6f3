"""Learning-rate schedules as pure functions of the optimizer step (so resume needs only the step)."""

from __future__ import annotations

import math

import torch

from lmstack.train.config import ScheduleConfig


def lr_at(step: int, peak_lr: float, cfg: ScheduleConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Warmup is linear from peak/warmup at step 0 to peak at step warmup-1 (never 0, so the first step
    learns). Then `cfg.kind` decays from peak to `cfg.min_lr` at step `decay_steps` (default
    `total_steps`) and stays there.
    """
    if step < cfg.warmup_steps:
        return peak_lr * (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return peak_lr
    end = cfg.decay_steps if cfg.decay_steps is not None else total_steps
    if step >= end:
        return cfg.min_lr
    if cfg.kind == "wsd":
        decay_start = end - max(1, round(cfg.wsd_decay_fraction * (end - cfg.warmup_steps)))
        if step < decay_start:
            return peak_lr
        progress = (step - decay_start) / (end - decay_start)
        return peak_lr + progress * (cfg.min_lr - peak_lr)
    progress = (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps)  # in [0, 1)
    if cfg.kind == "linear":
        return peak_lr + progress * (cfg.min_lr - peak_lr)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine: 1 -> 0
    return cfg.min_lr + coeff * (peak_lr - cfg.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate: `lr` times the group's "lr_scale" (1 when it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
