"""Safetensors model directories for the encoder and encoder-decoder converters: read tensors by name into a
model built on the meta device, and write them back sharded (with an index) like transformers.

(lmstack.interop.hf does the same for the decoder with its own family-specific renames; both read one
tensor at a time, so a checkpoint never sits in memory twice.)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lmstack.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@contextlib.contextmanager
def open_weights(file: Path) -> Iterator[Any]:
    """safe_open; a file that is not readable safetensors (a copy or a save cut short) is one CheckpointError
    naming it, since safetensors' own message names no file."""
    try:
        with safe_open(file, framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file, truncated or corrupt ({e}); copy or save "
                              "it again") from None


def tensor_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SINGLE_FILE
    if single.exists():
        with open_weights(single) as f:
            return {name: single for name in f.keys()}
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise CheckpointError(f"{directory}: only pickle weights (*.bin / *.pt) found; lmstack reads safetensors "
                              "only (convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")


def load_into(model: nn.Module, directory: Path, rename: Callable[[str], str | None],
              dtype: torch.dtype | None = None) -> None:
    """Assign every tensor of `directory` to the meta-device `model` under `rename(hf_name)` (None = skip it),
    checking names, shapes and completeness; tensors become `dtype` (default fp32, the CPU policy)."""
    expected = model.state_dict()
    tied = set(_ties(model))
    files = tensor_files(directory)
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    state: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        if not file.exists():
            raise CheckpointError(f"{file}: listed in {INDEX_FILE} but missing")
        with open_weights(file) as f:
            for hf_name in names:
                name = rename(hf_name)
                if name is None:
                    continue
                if name not in expected:
                    raise CheckpointError(f"{file}: unexpected tensor {hf_name} for a {type(model).__name__} with "
                                          "this config.json (is it another architecture?)")
                tensor = f.get_tensor(hf_name)
                if not tensor.is_floating_point():
                    raise CheckpointError(f"{file}: tensor {hf_name} has dtype {tensor.dtype}; expected floating point")
                if tuple(tensor.shape) != tuple(expected[name].shape):
                    raise CheckpointError(f"{file}: tensor {hf_name} has shape {tuple(tensor.shape)}, but "
                                          f"config.json implies {tuple(expected[name].shape)} for {name}")
                state[name] = tensor.to(dtype or torch.float32)
    missing = sorted(set(expected) - set(state) - tied)
    if missing:
        raise CheckpointError(f"{directory}: missing tensor {missing[0]} ({len(missing)} missing in all)")
    assign(model, state)


def assign(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict(assign=True) that keeps tied parameters tied (assign replaces each name on its own)."""
    ties = _ties(model)
    model.load_state_dict({k: v for k, v in state.items() if k not in ties}, strict=False, assign=True)
    for name, first in ties.items():
        module_name, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(module_name), leaf, model.get_parameter(first))


def _ties(model: nn.Module) -> dict[str, str]:
    """Parameter name -> the earlier name it shares its parameter with (tied weights are stored once)."""
    first: dict[int, str] = {}
    ties = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties[name] = first[id(p)]
        else:
            first[id(p)] = name
    return ties


def write_tensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    """Write `tensors` as model.safetensors, or shards of at most `max_shard_bytes` plus the index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2))


def unique_state(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The model's tensors by name, each shared parameter once (under its first name), as contiguous CPU copies."""
    tied = _ties(model)
    return {name: t.detach().to("cpu", dtype or t.dtype).contiguous().clone()
            for name, t in model.state_dict().items() if name not in tied}
