"""Calibration data and the block-by-block walk that GPTQ, AWQ and SmoothQuant share.

Calibration text is a file / directory the user names, or the built-in corpus; it is tokenized,
joined with the end-of-sequence token between documents, and cut into `n_samples` windows of
`seq_len` tokens taken at evenly spaced offsets (deterministic, no RNG).

`BlockWalk` runs the calibration windows through the decoder one block at a time: it captures what
block 0 receives (hidden states, RoPE tables, mask), lets a method inspect / quantize a block, then
runs that (now quantized) block to produce the next block's inputs. So each block is calibrated on
the activations the quantized model will really feed it, as GPTQ does, with one block's
activations in memory at a time.

Shapes: n windows, T tokens per window, d width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from lmstack.data.builtin import read_builtin
from lmstack.data.ingest import IngestStats, expand_inputs, read_documents
from lmstack.errors import DataError

BUILTIN = "builtin:python-docs"


def calibration_texts(sources: list[str] | None) -> Iterator[str]:
    """Documents from files / directories / globs, or `builtin:NAME` (the default: the built-in corpus)."""
    sources = sources or [BUILTIN]
    stats = IngestStats()
    for source in sources:
        if source.startswith("builtin:"):
            yield from (doc.text for doc in read_builtin(source.removeprefix("builtin:"), stats))
        else:
            paths = expand_inputs([source])
            if not paths:
                raise DataError(f"--calib {source}: no such file or directory (give a text / JSONL / Parquet file, "
                                f"a directory of them, or {BUILTIN})")
            yield from (doc.text for doc in read_documents([Path(p) for p in paths], stats))


def calibration_tokens(tokenizer, sources: list[str] | None, n_samples: int = 64, seq_len: int = 256,
                       eos_id: int | None = None) -> torch.Tensor:
    """(n_samples, seq_len) token windows from the calibration text. DataError when there is too little."""
    need = n_samples * seq_len
    ids: list[int] = []
    for text in calibration_texts(sources):
        ids.extend(tokenizer.encode(text))
        if eos_id is not None:
            ids.append(eos_id)
        if len(ids) >= 4 * need:  # enough to spread the windows over several documents
            break
    if len(ids) < seq_len + 1:
        where = ", ".join(sources or [BUILTIN])
        raise DataError(f"calibration data {where}: {len(ids)} tokens, need at least {seq_len + 1} "
                        f"(one window of --calib-seq-len); give more text with --calib")
    stream = torch.tensor(ids, dtype=torch.long)
    starts = torch.linspace(0, len(ids) - seq_len, n_samples).long()
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])  # (n, T)


@torch.no_grad()
def mean_nll(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token negative log-likelihood (nats) of `tokens` (n, T) under the model; exp() = perplexity."""
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        batch = tokens[i:i + batch_size]
        targets = torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], -100)], dim=1)  # (b, T): last one unscored
        total += float(model(batch, targets=targets))
        count += int((targets != -100).sum())
    return total / count


class _Captured(Exception):
    pass


class BlockWalk:
    """The calibration windows as inputs to each decoder block in turn (see the module docstring)."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, batch_size: int = 8):
        self.model = model
        self.blocks = list(model.model.layers)
        self.batches: list[list] = []  # per batch: [x (b, T, d), rope, mask, cache_slots]
        handle = self.blocks[0].register_forward_pre_hook(self._capture)
        try:
            with torch.no_grad():
                for i in range(0, tokens.shape[0], batch_size):
                    try:
                        model.hidden_states(tokens[i:i + batch_size])
                    except _Captured:
                        pass
        finally:
            handle.remove()

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self.batches.append(list(args))
        raise _Captured

    def inputs(self) -> list[torch.Tensor]:
        """This block's input hidden states, one (b, T, d) tensor per batch."""
        return [args[0] for args in self.batches]

    @torch.no_grad()
    def run(self, block: nn.Module) -> list[torch.Tensor]:
        """Run `block` on every batch of its inputs -> its outputs (b, T, d) per batch."""
        return [block(*args) for args in self.batches]

    @torch.no_grad()
    def advance(self, block: nn.Module) -> None:
        """Replace the stored inputs by `block`'s outputs: the next block's inputs."""
        for args, out in zip(self.batches, self.run(block)):
            args[0] = out

    def walk(self, process: Callable[[int, str, nn.Module], None]) -> None:
        """For each block: process(index, name prefix, block), then advance past it."""
        for i, block in enumerate(self.blocks):
            process(i, f"model.layers.{i}.", block)
            self.advance(block)


@torch.no_grad()
def record_inputs(block: nn.Module, walk: BlockWalk, names: list[str],
                  on_input: Callable[[str, torch.Tensor], None]) -> None:
    """Run `block` over the walk's current inputs and call on_input(name, x (b, T, k)) for each named
    submodule's input."""
    modules = dict(block.named_modules())
    handles = [modules[name].register_forward_pre_hook(lambda m, args, name=name: on_input(name, args[0]))
               for name in names]
    try:
        walk.run(block)
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["BUILTIN", "BlockWalk", "calibration_texts", "calibration_tokens", "mean_nll", "record_inputs"]
