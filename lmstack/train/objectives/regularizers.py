"""Penalties against catastrophic forgetting, as objective terms usable with any objective and any weight method.

    EWC (Kirkpatrick et al. 2017)   sum_i lambda / 2 * F_i * (theta_i - theta*_i)^2, F a diagonal Fisher on old data
    L2-SP (Li et al. 2018)          alpha / 2 * ||theta - theta0||^2      (the paper's alpha/2; the issue writes
                                                                           lambda * ||.||^2: the same with alpha = 2 lambda)

theta - theta* is the change of each *base* weight, whatever trains it: the parameter itself (full
fine-tuning), LoRA / DoRA's merged update (s B A; DoRA's direction norm detached, as in its backward), or
IA3's scaling (W * (l - 1)). So one Fisher file, estimated on the base model, serves every such method.
Methods that change no base weight (prompt, prefix, bottleneck) have nothing for EWC to hold: an error.

`estimate_fisher` computes the empirical diagonal Fisher: the squared gradient of each window's mean
token log-likelihood, averaged over windows. `save_fisher` stores it as safetensors with the model's
fingerprint (a hash of its parameter names, shapes and values), and `load_fisher` refuses a file made
for another model.

`regularized(objective, penalty)` adds a penalty to an objective's Loss so that the engine's division by
the step's item count leaves exactly one penalty per optimizer step (each micro-batch adds penalty * count).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from lmstack.adapters.ia3 import IA3Linear
from lmstack.adapters.lora import LoraLinear, dense_weight
from lmstack.atomic import atomic_file
from lmstack.errors import CheckpointError, ConfigError
from lmstack.train.objectives.loss import Loss

FISHER_FORMAT = "lmstack-fisher-v1"


def fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter's name, shape and fp32 bytes (the weights a Fisher belongs to)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(f"{name}:{tuple(p.shape)};".encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def estimate_fisher(model: nn.Module, windows: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of every parameter: mean over windows (inputs (T,), targets (T,)) of the
    squared gradient of the window's mean token log-likelihood."""
    params = {n: p for n, p in model.named_parameters()}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training, grads = model.training, [p.requires_grad for p in params.values()]
    model.eval()
    for p in params.values():
        p.requires_grad_(True)
    count = 0
    try:
        for inputs, targets in windows:
            model.zero_grad(set_to_none=True)
            loss = model(inputs[None], targets=targets[None]) / targets.numel()
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.float() ** 2
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        for p, g in zip(params.values(), grads):
            p.requires_grad_(g)
    if count == 0:
        raise ConfigError("estimate_fisher: no windows of data")
    return {n: f / count for n, f in fisher.items()}


def save_fisher(path: str | Path, fisher: dict[str, torch.Tensor], model_fingerprint: str, windows: int) -> Path:
    path = Path(path)
    meta = {"format": FISHER_FORMAT, "fingerprint": model_fingerprint, "windows": str(windows)}
    with atomic_file(path, "wb") as f:
        f.write(save({k: v.contiguous().cpu() for k, v in fisher.items()}, metadata=meta))
    return path


def load_fisher(path: str | Path, model_fingerprint: str) -> dict[str, torch.Tensor]:
    """The Fisher in `path`, refused unless it was estimated on the model with this fingerprint."""
    path = Path(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: cannot read a Fisher file ({e})") from None
    if meta.get("format") != FISHER_FORMAT:
        raise CheckpointError(f"{path}: not an lmstack Fisher file (format {meta.get('format')!r})")
    if meta.get("fingerprint") != model_fingerprint:
        raise CheckpointError(f"{path}: this Fisher was estimated on another model (fingerprint "
                              f"{str(meta.get('fingerprint'))[:12]}..., this base is {model_fingerprint[:12]}...); "
                              "estimate it again for this base (delete the file, or point ewc_fisher elsewhere)")
    return tensors


def base_weight_deltas(model: nn.Module, anchors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Base parameter name -> its current change, differentiable in whatever trains it.

    anchors: starting values of base parameters that train directly (full fine-tuning)."""
    deltas: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear) and module.enabled:
            w = dense_weight(module.base_layer).float()
            d = module.delta_weight().float()
            if module.use_dora:  # DoRA's effective weight, its direction norm held constant (as in DoRA's backward)
                merged = w + d
                norm = torch.linalg.vector_norm(merged, dim=1).detach()
                d = merged * (module.lora_magnitude_vector.float() / norm)[:, None] - w
            deltas[f"{name}.weight"] = d
        elif isinstance(module, IA3Linear) and module.enabled:
            deltas[f"{name}.weight"] = dense_weight(module.base_layer).float() * (module.ia3_l.float() - 1)
    params = dict(model.named_parameters())
    for name, theta0 in anchors.items():
        deltas[name] = params[name].float() - theta0
    return deltas


def ewc_penalty(model: nn.Module, fisher: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor],
                lam: float) -> torch.Tensor:
    """sum lambda/2 * F * delta^2 over the base weights that changed (rows added to a resized vocabulary: F = 0)."""
    total = torch.zeros((), device=next(model.parameters()).device)
    for name, delta in base_weight_deltas(model, anchors).items():
        f = fisher.get(name)
        if f is None:
            continue
        f = f.to(delta.device)
        if f.shape != delta.shape:
            rows = min(f.shape[0], delta.shape[0])
            if f.shape[1:] != delta.shape[1:]:
                raise CheckpointError(f"Fisher tensor {name} has shape {tuple(f.shape)}, the model's is "
                                      f"{tuple(delta.shape)}")
            delta = delta[:rows]
            f = f[:rows]
        total = total + (f * delta**2).sum()
    return lam / 2 * total


def l2sp_penalty(model: nn.Module, anchors: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """alpha/2 * ||theta - theta0||^2 over the changed base weights (and, for methods without base weights, over
    the method's own parameters against their starting values, given in `anchors`)."""
    total = torch.zeros((), device=next(model.parameters()).device)
    for delta in base_weight_deltas(model, anchors).values():
        total = total + (delta**2).sum()
    return alpha / 2 * total


def regularized(objective: Callable[[nn.Module, dict], Loss], penalty: Callable[[nn.Module], torch.Tensor],
                name: str = "penalty") -> Callable[[nn.Module, dict], Loss]:
    """objective + penalty: each micro-batch adds penalty * its item count, so the engine's one division per
    step gives loss mean + penalty. The penalty is logged (per item, i.e. its value) as `name`."""

    def objective_with_penalty(model: nn.Module, batch: dict) -> Loss:
        loss = objective(model, batch)
        count = torch.as_tensor(loss.count, device=loss.total.device, dtype=torch.float32)
        term = penalty(model)
        return loss + Loss(term * count, loss.count, {name: term.detach() * count})

    return objective_with_penalty


__all__ = ["base_weight_deltas", "estimate_fisher", "ewc_penalty", "fingerprint", "l2sp_penalty", "load_fisher",
           "regularized", "save_fisher"]
