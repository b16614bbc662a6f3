"""The pretraining loader: memory-mapped token shards -> deterministic (inputs, targets) windows.

Reads the `lmstack-tokens-v1` layout written by `lmstack data prepare`:
DIR/{train,val}/index.json + shard-NNNNN.bin (flat little-endian uint16/uint32 token ids).

Determinism is the contract that makes resume and distributed training exact: the global batch at
optimizer step s is `batch_size * grad_accum * world_size` windows whose start offsets come from a
generator seeded by (seed, s). Rank r takes rows [r*B*A, (r+1)*B*A) and splits them into A
micro-batches of B rows. So 2 processes with batch B see exactly the rows 1 process with batch 2B
sees, and a resumed run sees exactly the batches it would have seen — no iterator state to save.

Shapes: B windows per micro-batch, T tokens per window.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmstack.errors import DataError
from lmstack.schema import read_json

FORMAT = "lmstack-tokens-v1"
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


@dataclass
class SplitInfo:
    vocab_size: int
    eos_token_id: int
    tokenizer_sha256: str
    num_tokens: int
    num_documents: int


class TokenStream:
    """One split (train or val) viewed as a single token stream across its memory-mapped shards."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index_path = self.directory / "index.json"
        index = read_json(index_path, DataError, "not found; prepare data with `lmstack data prepare`")
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise DataError(f"{index_path}: format is {index.get('format') if isinstance(index, dict) else None!r}, "
                            f"expected {FORMAT!r}")
        try:
            dtype = _DTYPES[index["dtype"]]
            self.info = SplitInfo(int(index["vocab_size"]), int(index["eos_token_id"]),
                                  str(index.get("tokenizer_sha256", "")), int(index["num_tokens"]),
                                  int(index.get("num_documents", 0)))
            shards = index["shards"]
        except KeyError as e:
            raise DataError(f"{index_path}: missing or unknown value for key {e.args[0]!r}") from None
        if not shards:
            raise DataError(f"{index_path}: no shards listed")
        self.shards: list[np.memmap] = []
        for i, shard in enumerate(shards):
            path = self.directory / shard["file"]
            expected = int(shard["num_tokens"])
            if not path.exists():
                raise DataError(f"{path}: listed in {index_path} but missing")
            size = path.stat().st_size
            if size != expected * dtype.itemsize:
                raise DataError(f"{path}: {size} bytes, but {index_path} shards[{i}] says {expected} "
                                f"{index['dtype']} tokens ({expected * dtype.itemsize} bytes)")
            if expected:
                self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        if int(lengths.sum()) != self.info.num_tokens:
            raise DataError(f"{index_path}: num_tokens is {self.info.num_tokens} but the shards hold {lengths.sum()}")
        self.starts = np.concatenate([[0], np.cumsum(lengths)])  # stream offset of each shard

    def __len__(self) -> int:
        return self.info.num_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the stream as int64, crossing shard boundaries as needed."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < length:
            offset = start + filled - int(self.starts[shard])
            piece = self.shards[shard][offset:offset + length - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            shard += 1
        return out

    def windows(self, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows of seq_len+1 tokens at `starts` -> inputs (N, T) and targets (N, T) = inputs shifted by one."""
        rows = np.stack([self.read(int(s), seq_len + 1) for s in starts])  # (N, T+1)
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class PretrainBatches:
    """Random windows of the train split, a pure function of (seed, step, rank).

    `micro_batches(step)` -> this rank's `grad_accum` micro-batches, each (inputs (B, T), targets (B, T)).
    """

    def __init__(self, stream: TokenStream, seq_len: int, batch_size: int, grad_accum: int = 1, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if len(stream) < seq_len + 2:
            raise DataError(f"{stream.directory}: {len(stream)} tokens, too few for windows of {seq_len} + 1 tokens")
        self.stream, self.seq_len, self.batch_size, self.grad_accum = stream, seq_len, batch_size, grad_accum
        self.seed, self.rank, self.world_size = seed, rank, world_size

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step across all ranks."""
        return self.batch_size * self.grad_accum * self.world_size * self.seq_len

    def global_starts(self, step: int) -> np.ndarray:
        """Start offsets of every window of step `step`, all ranks, in rank-major order."""
        rng = np.random.default_rng([self.seed, step])
        count = self.batch_size * self.grad_accum * self.world_size
        return rng.integers(0, len(self.stream) - self.seq_len, size=count)  # last start leaves T+1 tokens

    def state_dict(self, step: int) -> dict[str, int]:
        """The data position to store in a checkpoint: the order is a pure function of these."""
        return {"next_step": step, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch_windows": self.batch_size * self.grad_accum * self.world_size}

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        per_rank = self.batch_size * self.grad_accum
        mine = self.global_starts(step)[self.rank * per_rank:(self.rank + 1) * per_rank]
        inputs, targets = self.stream.windows(mine, self.seq_len)  # (B*A, T) each
        return [(inputs[i:i + self.batch_size], targets[i:i + self.batch_size])
                for i in range(0, per_rank, self.batch_size)]


class SeededRowBatches:
    """The batch-source plumbing of the denoising objectives (MLM, span corruption): every row is built from its own
    generator seeded by (seed, step, row index), so a step's rows are a pure function of the step and resume is exact.
    A subclass sets stream / seq_len / batch_size / grad_accum / seed / rank / world_size and defines
    `row(rng)` and `collate(rows)`."""

    stream: TokenStream
    seq_len: int
    batch_size: int
    grad_accum: int
    seed: int
    rank: int
    world_size: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size * self.seq_len

    def state_dict(self, step: int) -> dict[str, int]:
        return {"next_step": step, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch_windows": self.batch_size * self.grad_accum * self.world_size}

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        per_rank = self.batch_size * self.grad_accum
        first = self.rank * per_rank
        rows = [self.row(np.random.default_rng([self.seed, step, first + i])) for i in range(per_rank)]
        return [self.collate(rows[i:i + self.batch_size]) for i in range(0, per_rank, self.batch_size)]

    def validation(self, max_rows: int, batch_size: int, rank: int = 0) -> list[dict[str, torch.Tensor]]:
        """A fixed validation set (rows seeded by their index, not the step; rank r takes its own rows)."""
        rows = [self.row(np.random.default_rng([self.seed, 1 << 30, rank * max_rows + i])) for i in range(max_rows)]
        return [self.collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]

    def row(self, rng: np.random.Generator):
        raise NotImplementedError

    def collate(self, rows: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def validation_batches(stream: TokenStream, seq_len: int, batch_size: int, max_windows: int, rank: int = 0,
                       world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set: non-overlapping windows covering the split (evenly thinned to `max_windows`).

    Windows are grouped into global batches of `batch_size * world_size` rows; rank r takes its B rows
    of each, so every rank runs the same number of forward passes (needed by FSDP) and the mean over
    ranks is the mean over the set. Windows that do not fill a last global batch are dropped.
    """
    count = (len(stream) - 1) // seq_len
    if count < world_size:
        raise DataError(f"{stream.directory}: {len(stream)} tokens give {count} validation windows of {seq_len}; "
                        f"need at least one per process ({world_size})")
    index = np.arange(count) if count <= max_windows else np.linspace(0, count - 1, max_windows).round().astype(int)
    per_batch = min(batch_size, len(index) // world_size) * world_size
    used = len(index) // per_batch * per_batch
    starts = index[:used].reshape(-1, per_batch) * seq_len  # (num_batches, B * world)
    rows = per_batch // world_size
    return [stream.windows(batch[rank * rows:(rank + 1) * rows], seq_len) for batch in starts]


__all__ = ["DataError", "PretrainBatches", "TokenStream", "validation_batches"]
