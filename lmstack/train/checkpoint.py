"""Training checkpoints: the model (as the run's `ModelStore` writes it) plus the state to continue exactly.

    OUT/checkpoints/step-00000500/
        config.json, model.safetensors, generation_config.json   (WholeModel: transformers loads this as is)
          or trainable.safetensors                                (TrainableOnly; adapters write their own format)
        tokenizer.json, tokenizer_config.json                     (copied from the data's tokenizer)
        optimizer.safetensors   every optimizer tensor (AdamW moments and step counts), by parameter name
        optimizer.json          the rest of the optimizer state_dict: param groups, non-tensor entries
        trainer_state.json      step, tokens seen, best validation loss, data position, seed, the run config
    OUT/checkpoints/best.json   which checkpoint has the best validation loss
    OUT/checkpoints/latest, best   symlinks to the newest and the best checkpoint (where the OS has them)

No pickle: the optimizer state_dict is flattened into named tensors plus a JSON skeleton. Each
checkpoint directory is written atomically (temporary directory, then one rename), so a kill -9 at
any moment leaves only complete checkpoints. The learning-rate schedule and the data order are pure
functions of the step, so the step is all the scheduler and data-position state there is.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lmstack.atomic import atomic_dir, write_text
from lmstack.errors import CheckpointError, ConfigError
from lmstack.interop.hf import load_state_dict, read_config, write_weights
from lmstack.schema import read_json
from lmstack.train.distributed import full_model_state

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_SKELETON = "optimizer.json"
TRAINER_STATE = "trainer_state.json"
BEST = "best.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


TRAINABLE_TENSORS = "trainable.safetensors"


@dataclass
class Checkpoint:
    path: Path
    model_state: dict[str, torch.Tensor]  # what the store wrote: parameter names -> tensors
    optimizer_state: dict[str, Any]  # torch name-keyed optimizer state_dict (full, unsharded)
    trainer_state: dict[str, Any]


# ------------------------------------------------------------------------------- what a checkpoint holds
class ModelStore(Protocol):
    """What a checkpoint holds of the model, chosen by the recipe: the whole model (pretraining, full
    fine-tuning) or only what trains (an adapter). `state` runs on every rank (it may gather shards);
    `write` and `read` run on rank 0 / at resume."""

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors to store, by parameter name (full, unsharded, on the CPU)."""
        ...

    def write(self, model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
        """Write `state` (and any files that make the directory usable, e.g. a tokenizer) into `directory`."""
        ...

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        """The state a `write` put in `directory`."""
        ...

    def load_into(self, model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
        """Put a read state back into the (unwrapped) model before training resumes."""
        ...


def _load_or_explain(model: nn.Module, state: dict[str, torch.Tensor], directory: Path, strict: bool) -> None:
    try:
        result = model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise CheckpointError(f"{directory}: does not fit the configured model (was the model config changed?): "
                              f"{str(e).splitlines()[-1].strip()}") from None
    if not strict and result.unexpected_keys:
        raise CheckpointError(f"{directory}: holds {result.unexpected_keys[0]}, which the configured model does not "
                              "have (was the model config changed?)")


@dataclass
class WholeModel:
    """Every weight, as a Hugging Face model directory (config.json + safetensors) that transformers and
    `lmstack.load_model` open as is; `extra_files` (name -> path, e.g. the tokenizer) are copied beside."""

    extra_files: dict[str, Path] = field(default_factory=dict)

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return full_model_state(model)

    def write(self, model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
        with torch.device("meta"):
            holder = type(model)(model.config)  # a parameter-free shell: write_weights takes names and config
        holder.load_state_dict(state, strict=False, assign=True)
        write_weights(holder, directory, dtype=torch.float32)  # fp32 master weights: resume is bitwise exact
        for name, source in self.extra_files.items():
            shutil.copyfile(source, directory / name)

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        config = read_config(directory)
        state = load_state_dict(directory, config)
        if config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        return state

    def load_into(self, model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
        _load_or_explain(model, state, directory, strict=True)


@dataclass
class TrainableOnly:
    """Only the parameters that train (requires_grad), in one safetensors file: for a run whose frozen
    weights come from elsewhere (a base model the recipe loads). Adapters write their own format."""

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        return {name: t for name, t in full_model_state(model).items() if name in trainable}

    def write(self, model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, directory / TRAINABLE_TENSORS, metadata={"format": "pt"})

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        if not (directory / TRAINABLE_TENSORS).exists():
            raise CheckpointError(f"{directory / TRAINABLE_TENSORS}: not found")
        return load_file(directory / TRAINABLE_TENSORS)

    def load_into(self, model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
        missing = sorted({n for n, p in model.named_parameters() if p.requires_grad} - set(state))
        if missing:
            raise CheckpointError(f"{directory}: no tensor for trainable parameter {missing[0]} "
                                  f"({len(missing)} missing): was a different set of parameters trained?")
        _load_or_explain(model, state, directory, strict=False)


# ------------------------------------------------------------------------------- optimizer state <-> files
def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """{"state": {param: {key: tensor|value}}, "param_groups": [...]} -> (named tensors, JSON skeleton).

    A tensor entry is stored as "{param}/{key}" in the tensors and {"tensor": "{param}/{key}"} in the
    skeleton; a plain value as {"value": v}.
    """
    tensors: dict[str, torch.Tensor] = {}
    skeleton: dict[str, Any] = {"state": {}, "param_groups": []}
    for param, entry in state["state"].items():
        slots: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                name = f"{param}/{key}"
                tensors[name] = value.detach().to("cpu").contiguous()
                slots[key] = {"tensor": name}
            else:
                slots[key] = {"value": value}
        skeleton["state"][param] = slots
    for group in state["param_groups"]:
        skeleton["param_groups"].append({k: list(v) if isinstance(v, tuple) else v for k, v in group.items()})
    return tensors, skeleton


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], skeleton: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_optimizer_state`."""
    state = {param: {key: tensors[slot["tensor"]] if "tensor" in slot else slot["value"] for key, slot in slots.items()}
             for param, slots in skeleton["state"].items()}
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in skeleton["param_groups"]]
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------------------- save / load
def save_checkpoint(path: str | Path, store: ModelStore, model: nn.Module, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], trainer_state: dict[str, Any]) -> Path:
    """Atomically write one checkpoint directory from full (unsharded, CPU) states. Rank 0 only."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        store.write(model, model_state, tmp)
        tensors, skeleton = flatten_optimizer_state(optimizer_state)
        save_file(tensors, tmp / OPTIMIZER_TENSORS, metadata={"format": "pt"})
        (tmp / OPTIMIZER_SKELETON).write_text(json.dumps(skeleton, indent=1) + "\n")
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
    return path


def load_checkpoint(path: str | Path, store: ModelStore | None = None) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` with `store` (default WholeModel); errors name the
    missing or broken file."""
    path = Path(path)
    for name in (TRAINER_STATE, OPTIMIZER_TENSORS, OPTIMIZER_SKELETON):
        if not (path / name).exists():
            raise CheckpointError(f"{path / name}: not found; {path} is not a complete lmstack training checkpoint")
    try:
        model_state = (store or WholeModel()).read(path)
        optimizer_tensors = load_file(path / OPTIMIZER_TENSORS)
    except SafetensorError as e:
        raise unreadable_weights(path, e) from None
    skeleton = read_json(path / OPTIMIZER_SKELETON, CheckpointError)
    trainer_state = read_json(path / TRAINER_STATE, CheckpointError)
    optimizer_state = unflatten_optimizer_state(optimizer_tensors, skeleton)
    return Checkpoint(path, model_state, optimizer_state, trainer_state)


def unreadable_weights(directory: str | Path, error: Exception) -> CheckpointError:
    """A SafetensorError met reading `directory` -> one CheckpointError naming the broken file (the
    safetensors message names none): typically a copy or a save cut short."""
    directory = Path(directory)
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            error = e
            break
    else:
        file = directory
    return CheckpointError(f"{file}: not a readable safetensors file, truncated or corrupt ({error}); copy or save "
                           "it again, or use another checkpoint")


# ------------------------------------------------------------------------------- the checkpoints folder
def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary directories of a killed save are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / TRAINER_STATE).exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def resume_point(out_dir: Path, resume: bool) -> Path | None:
    """What a recipe resumes from: OUT's latest checkpoint with `resume`, else None; a ConfigError when --resume
    finds none, or when a fresh run would write over OUT's checkpoints."""
    root = out_dir / "checkpoints"
    if resume:
        latest = latest_checkpoint(root)
        if latest is None:
            raise ConfigError(f"--resume: no checkpoint under {root}")
        return latest
    if list_checkpoints(root):
        raise ConfigError(f"{out_dir} already holds checkpoints; pass --resume to continue that run or choose "
                          "another out_dir")
    return None


def begin_run(train, out_dir: Path, resume: bool) -> Path | None:
    """What every recipe does before it reads data or writes anything: take `train.threads`, refuse a precision
    the device lacks (bf16 on a CPU without it) and decide where to resume from (`resume_point`)."""
    from lmstack.device import resolve_device, resolve_precision

    if train.threads is not None:
        torch.set_num_threads(train.threads)
    resolve_precision(train.precision, resolve_device(train.device))
    return resume_point(out_dir, resume)


def write_run_record(out_dir: Path, tokenizer, run_config: dict, report: dict, main: bool = True) -> dict[str, Path]:
    """What a fine-tuning run keeps beside its checkpoints: the tokenizer, config.yaml and data_report.json (only the
    main process writes them). Returns the tokenizer's files by name, for the checkpoint store to copy into each
    checkpoint."""
    tokenizer_dir = out_dir / "tokenizer"
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(tokenizer_dir)
        write_text(out_dir / "config.yaml", yaml.safe_dump(run_config, sort_keys=False))
        write_text(out_dir / "data_report.json", json.dumps(report, indent=2) + "\n")
    return {p.name: p for p in sorted(tokenizer_dir.iterdir())} if tokenizer_dir.is_dir() else {}


def record_best(root: str | Path, checkpoint: Path, val_loss: float, step: int) -> None:
    write_text(Path(root) / BEST, json.dumps({"checkpoint": checkpoint.name, "val_loss": val_loss, "step": step}) + "\n")


def best_checkpoint(root: str | Path) -> Path | None:
    file = Path(root) / BEST
    if not file.exists():
        return None
    path = Path(root) / json.loads(file.read_text(encoding="utf-8"))["checkpoint"]
    return path if path.exists() else None


def update_links(root: str | Path) -> None:
    """Point root/latest and root/best at the newest and the best checkpoint (relative symlinks, each replaced
    in one rename), so `lmstack chat --model OUT/checkpoints/latest` needs no step number. Where the OS has no
    symlinks, nothing is linked (best.json still names the best)."""
    root = Path(root)
    for name, target in (("latest", latest_checkpoint(root)), ("best", best_checkpoint(root))):
        if target is None:
            continue
        tmp = root / f".{name}.tmp-{os.getpid()}"
        with contextlib.suppress(OSError, NotImplementedError):
            tmp.unlink(missing_ok=True)
            os.symlink(target.name, tmp, target_is_directory=True)
            os.replace(tmp, root / name)


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints and the best one; returns what was deleted."""
    checkpoints = list_checkpoints(root)
    keep = set(checkpoints[-keep_last:]) | {best_checkpoint(root)}
    removed = [p for p in checkpoints if p not in keep]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    # leftovers of saves killed mid-write
    for p in Path(root).glob(".step-*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    return removed
