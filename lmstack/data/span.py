"""T5's span-corruption batches from `lmstack data prepare` token shards.

From a window of the token stream, `noise_density` (15%) of the tokens are hidden in spans of mean length
`mean_noise_span_length` (3); the encoder reads the window with each span replaced by one sentinel, the
decoder predicts the spans behind their sentinels, then eos:

    window   the cat sat on the mat today
    inputs   the <extra_id_0> on the <extra_id_1> today </s>
    targets  <extra_id_0> cat sat <extra_id_1> mat </s>

As in T5's `random_spans_noise_mask`: round(L * density) noise tokens in round(noise / mean) spans, the
noise and the kept tokens each cut into that many random non-empty pieces and interleaved, kept first.
The window length is the longest whose corrupted input fits `seq_len` (T5's
compute_input_and_target_lengths), so every input is exactly seq_len tokens.

Sentinels are `<extra_id_i>` when the tokenizer has them; otherwise ids just above its vocabulary
(vocab_size + 99 - i, T5's top-down order), which the model's vocabulary then has to include
(`sentinel_vocab_size`). Rows are seeded by (seed, step, row) as the other loaders.

Shapes: B rows, S = seq_len encoder tokens, T target tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmstack.data.loader import SeededRowBatches, TokenStream
from lmstack.errors import DataError
from lmstack.tokenizer import Tokenizer

IGNORE_INDEX = -100
NUM_SENTINELS = 100


@dataclass
class SpanConfig:
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0


def span_lengths(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, spans) for a window of `length` tokens, as T5 rounds them."""
    noise = min(max(round(length * noise_density), 1), length - 1)
    return noise, max(round(noise / mean_span), 1)


def window_length(inputs_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """The longest raw window whose corrupted input (kept tokens + one sentinel per span + eos) is at most
    `inputs_length` -> (window length, target length incl. eos)."""
    def corrupted(length: int) -> tuple[int, int]:
        noise, spans = span_lengths(length, noise_density, mean_span)
        return length - noise + spans + 1, noise + spans + 1

    length = inputs_length
    while corrupted(length + 1)[0] <= inputs_length:
        length += 1
    return length, corrupted(length)[1]


def noise_mask(length: int, noise_density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """(length,) bool, True on the hidden tokens: spans alternating kept / noise, starting with kept."""
    noise, spans = span_lengths(length, noise_density, mean_span)

    def pieces(total: int) -> np.ndarray:  # `spans` random positive lengths summing to total
        cuts = np.sort(rng.choice(np.arange(1, total), size=spans - 1, replace=False)) if spans > 1 else []
        return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)

    kept, hidden = pieces(length - noise), pieces(noise)
    flags = np.repeat(np.tile([False, True], spans), np.stack([kept, hidden], 1).reshape(-1))
    return flags


def sentinel_ids(tokenizer: Tokenizer) -> tuple[list[int], int]:
    """(the 100 sentinel ids, the vocabulary size the model needs to cover them)."""
    named = [tokenizer.token_to_id(f"<extra_id_{i}>") for i in range(NUM_SENTINELS)]
    if all(i is not None for i in named):
        return named, tokenizer.vocab_size
    top = tokenizer.vocab_size + NUM_SENTINELS
    return [top - 1 - i for i in range(NUM_SENTINELS)], top


class SpanCorruptionBatches(SeededRowBatches):
    """Micro-batches of dicts: input_ids, attention_mask (B, S) and labels (B, T) (-100 on padding)."""

    def __init__(self, stream: TokenStream, tokenizer: Tokenizer, seq_len: int, batch_size: int,
                 grad_accum: int = 1, seed: int = 0, rank: int = 0, world_size: int = 1,
                 spans: SpanConfig | None = None):
        self.spans = spans or SpanConfig()
        self.window, self.target_len = window_length(seq_len, self.spans.noise_density,
                                                     self.spans.mean_noise_span_length)
        if len(stream) < 2 * self.window:
            raise DataError(f"{stream.directory}: {len(stream)} tokens, too few for span-corruption windows of "
                            f"{self.window}")
        self.sentinels, self.vocab_size = sentinel_ids(tokenizer)
        self.eos = stream.info.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.stream, self.seq_len, self.batch_size, self.grad_accum = stream, seq_len, batch_size, grad_accum
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def row(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        start = int(rng.integers(0, len(self.stream) - self.window))
        return self.corrupt(self.stream.read(start, self.window), rng)

    def corrupt(self, tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A window (L,) -> (encoder input with sentinels + eos, target: sentinel, span, ..., eos)."""
        hidden = noise_mask(len(tokens), self.spans.noise_density, self.spans.mean_noise_span_length, rng)
        starts = hidden & ~np.concatenate([[False], hidden[:-1]])  # the first token of each hidden span
        span = np.cumsum(starts) - 1  # the span a hidden token belongs to
        sentinel = np.asarray(self.sentinels)
        inputs = np.where(starts, sentinel[span.clip(min=0)], tokens)[~hidden | starts]  # a span -> its sentinel
        where = np.flatnonzero(hidden)
        first = starts[where]
        targets = np.insert(tokens[where], np.flatnonzero(first), sentinel[span[where][first]])  # sentinel, span, ...
        return np.append(inputs, self.eos), np.append(targets, self.eos)

    def collate(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
        S, T = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
        ids = torch.full((len(rows), S), self.pad, dtype=torch.long)
        mask = torch.zeros(len(rows), S, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            ids[i, :len(x)], mask[i, :len(x)], labels[i, :len(y)] = torch.from_numpy(x), 1, torch.from_numpy(y)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


__all__ = ["SpanConfig", "SpanCorruptionBatches", "noise_mask", "sentinel_ids", "span_lengths", "window_length"]
