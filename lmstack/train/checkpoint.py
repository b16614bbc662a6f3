"""Training checkpoints: a Hugging Face model directory plus the state to continue exactly.

    OUT/checkpoints/step-00000500/
        config.json, model.safetensors, generation_config.json   (transformers loads this as is)
        tokenizer.json, tokenizer_config.json                     (copied from the data's tokenizer)
        optimizer.safetensors   every optimizer tensor (AdamW moments and step counts), by parameter name
        optimizer.json          the rest of the optimizer state_dict: param groups, non-tensor entries
        trainer_state.json      step, tokens seen, best validation loss, data position, seed, the run config
    OUT/checkpoints/best.json   which checkpoint has the best validation loss

No pickle: the optimizer state_dict is flattened into named tensors plus a JSON skeleton. Each
checkpoint directory is written atomically (temporary directory, then one rename), so a kill -9 at
any moment leaves only complete checkpoints. The learning-rate schedule and the data order are pure
functions of the step, so the step is all the scheduler and data-position state there is.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmstack.atomic import atomic_dir, write_text
from lmstack.config import ModelConfig
from lmstack.interop.hf import (
    CheckpointError,
    load_state_dict,
    read_config,
    write_weights,
)
from lmstack.model.transformer import Transformer
from lmstack.schema import read_json

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_SKELETON = "optimizer.json"
TRAINER_STATE = "trainer_state.json"
BEST = "best.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    model_state: dict[str, torch.Tensor]  # lmstack parameter names (lm_head included when tied)
    optimizer_state: dict[str, Any]  # torch name-keyed optimizer state_dict (full, unsharded)
    trainer_state: dict[str, Any]


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
def save_checkpoint(path: str | Path, config: ModelConfig, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], trainer_state: dict[str, Any],
                    extra_files: dict[str, Path] | None = None) -> Path:
    """Atomically write one checkpoint directory from full (unsharded, CPU) states. Rank 0 only."""
    path = Path(path)
    with torch.device("meta"):
        holder = Transformer(config)  # a parameter-free shell that gives write_weights the names and config
    holder.load_state_dict(model_state, strict=False, assign=True)
    with atomic_dir(path) as tmp:
        write_weights(holder, tmp, dtype=torch.float32)  # fp32 master weights: resume must be bitwise exact
        tensors, skeleton = flatten_optimizer_state(optimizer_state)
        save_file(tensors, tmp / OPTIMIZER_TENSORS, metadata={"format": "pt"})
        (tmp / OPTIMIZER_SKELETON).write_text(json.dumps(skeleton, indent=1) + "\n")
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`; errors name the missing or broken file."""
    path = Path(path)
    for name in (TRAINER_STATE, OPTIMIZER_TENSORS, OPTIMIZER_SKELETON):
        if not (path / name).exists():
            raise CheckpointError(f"{path / name}: not found; {path} is not a complete lmstack training checkpoint")
    config = read_config(path)
    model_state = load_state_dict(path, config)
    if config.tie_word_embeddings:
        model_state["lm_head.weight"] = model_state["model.embed_tokens.weight"]
    skeleton = read_json(path / OPTIMIZER_SKELETON, CheckpointError)
    trainer_state = read_json(path / TRAINER_STATE, CheckpointError)
    optimizer_state = unflatten_optimizer_state(load_file(path / OPTIMIZER_TENSORS), skeleton)
    return Checkpoint(path, config, model_state, optimizer_state, trainer_state)


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


def record_best(root: str | Path, checkpoint: Path, val_loss: float, step: int) -> None:
    write_text(Path(root) / BEST, json.dumps({"checkpoint": checkpoint.name, "val_loss": val_loss, "step": step}) + "\n")


def best_checkpoint(root: str | Path) -> Path | None:
    file = Path(root) / BEST
    if not file.exists():
        return None
    path = Path(root) / json.loads(file.read_text(encoding="utf-8"))["checkpoint"]
    return path if path.exists() else None


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
