"""Process groups, model wrapping (DDP or FSDP2) and full (world-size independent) state dicts.

Launched by `torchrun --nproc_per_node=N`, each process reads RANK / WORLD_SIZE / LOCAL_RANK from the
environment; gloo is the backend on CPU, nccl on CUDA. Without torchrun everything here is a no-op
and the world is one process. Checkpoints always hold full (unsharded) tensors, gathered with
torch.distributed.checkpoint's state-dict helpers, so a checkpoint from N processes loads into M.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, plots and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistContext:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1); else a 1-process world."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend=backend)
    return ctx


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, strategy: str, ctx: DistContext, device: torch.device) -> nn.Module:
    """DDP (replicated weights, all-reduced gradients) or FSDP2 (each block's parameters sharded across ranks).

    Returns the module to call for forward/backward; `model` itself keeps its parameter names.
    """
    if not ctx.enabled:
        return model
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.model.layers:  # one all-gather per block in forward, freed after use
            fully_shard(block)
        fully_shard(model)  # the root: embeddings, final norm, head
        return model
    raise ValueError(f"train.distributed must be 'ddp' or 'fsdp', got {strategy!r}")


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter for micro-batches before the last of a step."""
    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The sum of a tensor over ranks (the tensor itself in a 1-process world)."""
    if not ctx.enabled:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def as_local_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's sharded result, e.g. a grad norm) gathered into a plain tensor."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


# torch.distributed.checkpoint is imported inside the functions below: it costs seconds of start-up time.
def _full_options():  # -> StateDictOptions
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights keyed by the plain parameter names (collective under FSDP: call on every rank)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_full_options())


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Unsharded optimizer state keyed by parameter name: {"state": {name: {...}}, "param_groups": [...]}."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full (unsharded, name-keyed) optimizer state into a possibly sharded optimizer; every rank passes it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=True))
