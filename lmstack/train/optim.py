"""AdamW with decoupled weight decay and the usual no-decay parameter groups.

Weight decay shrinks matrices towards zero; applied to norm gains or biases it only fights the
model's ability to scale and shift, so those never decay (GPT-2, Llama, nanoGPT practice).
Embeddings are a lookup table whose rows are updated only when their token appears; decaying them
every step shrinks rare tokens' rows, so they are left out by default (`decay_embeddings`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmstack.errors import TrainingError
from lmstack.train.config import OptimConfig

_EMBEDDING_NAMES = ("embed_tokens", "embed_positions")


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split trainable parameters into [decay, no-decay] groups. Tied weights appear once."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for name, param in model.named_parameters():  # named_parameters already skips tied duplicates
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        is_embedding = any(part in name for part in _EMBEDDING_NAMES)
        if param.ndim < 2 or (is_embedding and not cfg.decay_embeddings):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _fused_applies(groups: list[dict]) -> bool:
    """Whether torch's fused AdamW kernel can take every parameter: plain (not DTensor) floating-point
    tensors on the CPU or a GPU.

    "auto" prefers it because torch's own CPU default is the for-loop implementation: ~6 elementwise
    kernels per parameter tensor per step, each paying an OpenMP barrier on a busy machine. Fused does
    one pass per tensor (several times faster on the benchmark model: README, benchmark section).
    Sharded (FSDP2 DTensor) parameters keep torch's default.
    """
    params = [p for group in groups for p in group["params"]]
    return all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") and p.is_floating_point()
               for p in params)


def build_optimizer(model: nn.Module, cfg: OptimConfig,
                    groups_of: Callable[[nn.Module, OptimConfig], list[dict]] = parameter_groups) -> torch.optim.AdamW:
    """torch.optim.AdamW over the model's trainable parameters, grouped by `groups_of` (default: decay /
    no decay). A group may carry its own "lr_scale" (e.g. LoRA+'s faster B matrices): the engine sets
    each group's learning rate to the schedule's value times that scale.

    The learning rate is set per step by the engine from the schedule; `cfg.lr` is the initial value.
    `cfg.implementation="auto"` takes the fused kernel wherever it applies (see `_fused_applies`).
    """
    groups = groups_of(model, cfg)
    if not any(group["params"] for group in groups):
        raise TrainingError("the model has no trainable parameters (every parameter has requires_grad=False)")
    kwargs: dict = {}
    if cfg.implementation == "fused" or (cfg.implementation == "auto" and _fused_applies(groups)):
        kwargs["fused"] = True
    elif cfg.implementation == "foreach":
        kwargs["foreach"] = True
    elif cfg.implementation == "for-loop":
        kwargs["foreach"] = False
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             **kwargs)


__all__ = ["build_optimizer", "parameter_groups"]
