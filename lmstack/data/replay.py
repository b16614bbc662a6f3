"""Replay against forgetting: pretraining windows mixed into every fine-tuning micro-batch.

`ReplayBatches(sft_batches, stream, fraction)` wraps an SFT batch source: each micro-batch gets
r = round(B * fraction / (1 - fraction)) extra rows (at least one), so `fraction` of its rows are windows of
pretraining tokens with every token in the loss. The windows are drawn by a generator seeded by (seed, step,
rank, micro-batch): the batch source stays a pure function of the step, so resume and several ranks stay exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmstack.data.loader import TokenStream
from lmstack.errors import ConfigError

_REPLAY_STREAM = 1_000_003  # keeps replay's generator apart from the SFT shuffle's


class ReplayBatches:
    """An SFT batch source with `fraction` of each micro-batch's rows taken from pretraining windows."""

    def __init__(self, inner: Any, stream: TokenStream, fraction: float, seed: int = 0, rank: int = 0):
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"forgetting.replay_fraction must be in (0, 1), got {fraction}")
        self.inner, self.stream, self.fraction, self.seed, self.rank = inner, stream, fraction, seed, rank
        self.rows = max(1, round(inner.batch_size * fraction / (1.0 - fraction)))
        if len(stream) < inner.seq_len + 2:
            raise ConfigError(f"{stream.directory}: {len(stream)} tokens, too few for replay windows of "
                              f"{inner.seq_len} tokens")
        replayed = self.rows * inner.seq_len * inner.grad_accum * inner.world_size
        self.tokens_per_step = inner.tokens_per_step + replayed

    def __getattr__(self, name: str) -> Any:  # steps_per_epoch, rows_per_epoch, state_dict, ... are the SFT source's
        return getattr(self.inner, name)

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for i, batch in enumerate(self.inner.micro_batches(step)):
            T = batch["input_ids"].shape[1]
            rng = np.random.default_rng([self.seed, _REPLAY_STREAM, step, self.rank, i])
            starts = rng.integers(0, len(self.stream) - T, size=self.rows)
            inputs, targets = self.stream.windows(starts, T)  # (r, T) each
            ones = torch.ones_like(inputs)
            positions = torch.arange(T).expand_as(inputs)
            extra = {"input_ids": inputs, "targets": targets, "attention_mask": ones, "position_ids": positions}
            out.append({k: torch.cat([batch[k], extra[k].to(batch[k].dtype)]) for k in batch})
        return out


__all__ = ["ReplayBatches"]
