"""Sequence-classification data for fine-tuning an encoder: JSONL records -> [CLS] a [SEP] (b [SEP]) rows + labels.

A record is `{"text": ..., "label": ...}`, optionally with `"text_pair"` (NLI-style pairs: segment B,
token type 1). Labels are integers 0..num_labels-1 or names; names map to ids in the order of
`labels:` when it is set, else in sorted order of the names the training file uses. Every mistake
names the file:line: a missing or non-string field, a label outside num_labels, a name the training
data never used.

Rows are built as transformers' BERT tokenizer builds them: the pieces of each text, truncated
longest-first to fit the length with the specials, then `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`
with token types 0 ... 0 1 ... 1. A batch is right-padded to its longest row (padding masked).

Shapes: B rows per micro-batch, T tokens (the longest row of the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lmstack.data.sft import read_records
from lmstack.errors import ConfigError, DataError
from lmstack.tokenizer import Tokenizer


@dataclass
class ClassifyDataConfig:
    """Where the labelled texts are and how to read them.

    train / val: JSONL (or JSON array) files; without val, val_fraction of the training records (chosen with
    seed) are held out. labels: the label names in id order (default: the sorted names the training data uses;
    integer labels need none). max_samples: read at most this many training records.
    """

    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    text_field: str = "text"
    pair_field: str = "text_pair"
    label_field: str = "label"
    labels: list[str] | None = None
    max_samples: int | None = None
    seed: int = 0


@dataclass
class Example:
    ids: list[int]
    type_ids: list[int]
    label: int


def _field(record: dict, name: str, where: str, required: bool = True) -> str | None:
    value = record.get(name)
    if value is None and not required:
        return None
    if value is None:
        raise DataError(f"{where}: the record has no {name!r} field (it has {sorted(record)}); a classification "
                        f"record is {{\"text\": ..., \"label\": ...}}")
    if not isinstance(value, str):
        raise DataError(f"{where}: {name!r} must be a string, got {type(value).__name__}")
    return value


def read_labelled(paths: list[str], cfg: ClassifyDataConfig, limit: int | None = None
                  ) -> list[tuple[str, str, str | None, int | str]]:
    """(where, text, text_pair or None, raw label) for each record of the files."""
    out = []
    for path in paths:
        for where, record in read_records(path):
            if limit is not None and len(out) >= limit:
                return out
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            text = _field(record, cfg.text_field, where)
            pair = _field(record, cfg.pair_field, where, required=False)
            if cfg.label_field not in record:
                raise DataError(f"{where}: the record has no {cfg.label_field!r} field (it has {sorted(record)})")
            label = record[cfg.label_field]
            if isinstance(label, bool) or not isinstance(label, (int, str)):
                raise DataError(f"{where}: {cfg.label_field!r} must be an integer id or a label name, got {label!r}")
            out.append((where, text, pair, label))
    return out


def label_names(records: list[tuple], configured: list[str] | None) -> list[str] | None:
    """The label names in id order (None when the data uses integer ids and no names are configured)."""
    if configured is not None:
        return list(configured)
    mixed = next((r for r in records if isinstance(r[3], str) != isinstance(records[0][3], str)), None)
    if mixed is not None:
        raise DataError(f"{mixed[0]}: label {mixed[3]!r} mixes names and integer ids ({records[0][0]} has "
                        f"{records[0][3]!r}); use one kind")
    names = {r[3] for r in records if isinstance(r[3], str)}
    return sorted(names) if names else None


def resolve_label(where: str, label: int | str, names: list[str] | None, num_labels: int) -> int:
    if isinstance(label, str):
        if names is None or label not in names:
            known = f"the known labels are {names}" if names else "the training data uses integer labels"
            raise DataError(f"{where}: label {label!r} is not a known label name ({known}; set data.labels to "
                            "list every name in id order)")
        return names.index(label)
    if not 0 <= label < num_labels:
        raise DataError(f"{where}: label {label} is outside 0..{num_labels - 1} (num_labels {num_labels}); fix the "
                        "record or raise num_labels")
    return label


def encode_examples(tokenizer: Tokenizer, records: list[tuple], names: list[str] | None, num_labels: int,
                    max_len: int, cls: int, sep: int) -> tuple[list[Example], int]:
    """Records -> Examples of at most max_len tokens; -> (examples, how many were truncated)."""
    texts = [r[1] for r in records]
    pairs = [r[2] for r in records]
    firsts = tokenizer.encode_batch(texts)
    seconds = tokenizer.encode_batch([p or "" for p in pairs])
    examples, truncated = [], 0
    for (where, _, pair, label), a, b in zip(records, firsts, seconds):
        room = max_len - (3 if pair is not None else 2)
        if room < 1:
            raise ConfigError(f"train.seq_len ({max_len}) leaves no room for text next to [CLS] and [SEP]")
        b = b if pair is not None else []
        if len(a) + len(b) > room:  # longest-first, one piece at a time (transformers' truncation)
            truncated += 1
            a, b = list(a), list(b)
            while len(a) + len(b) > room:
                (a if len(a) > len(b) else b).pop()
        ids = [cls, *a, sep] + ([*b, sep] if pair is not None else [])
        types = [0] * (len(a) + 2) + ([1] * (len(b) + 1) if pair is not None else [])
        examples.append(Example(ids, types, resolve_label(where, label, names, num_labels)))
    return examples, truncated


def collate(examples: list[Example], pad: int) -> dict[str, torch.Tensor]:
    """Examples -> input_ids, attention_mask, token_type_ids (B, T) right-padded, labels (B,)."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad, dtype=torch.long)
    types = torch.zeros(len(examples), T, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.ids)] = torch.tensor(e.ids)
        types[row, :len(e.ids)] = torch.tensor(e.type_ids)
        mask[row, :len(e.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
            "labels": torch.tensor([e.label for e in examples])}


class ClassifyBatches:
    """The engine's batch source: a pure function of (seed, step, rank). Epoch e visits the examples in an order
    drawn from (seed, e); step s takes the next batch_size * grad_accum * world_size of that endless sequence."""

    def __init__(self, examples: list[Example], batch_size: int, grad_accum: int, pad: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if not examples:
            raise DataError("no training examples (the files are empty)")
        self.examples, self.batch_size, self.grad_accum, self.pad = examples, batch_size, grad_accum, pad
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.rows_per_step = batch_size * grad_accum * world_size
        self.rows_per_epoch = len(examples)
        self.tokens_per_step = round(self.rows_per_step * np.mean([len(e.ids) for e in examples]))

    def steps_per_epoch(self) -> float:
        return self.rows_per_epoch / self.rows_per_step

    def global_rows(self, step: int) -> list[int]:
        start, out = step * self.rows_per_step, []
        while len(out) < self.rows_per_step:
            epoch, offset = divmod(start + len(out), self.rows_per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.rows_per_epoch)
            out.extend(order[offset:offset + self.rows_per_step - len(out)].tolist())
        return out

    def state_dict(self, step: int) -> dict[str, int]:
        return {"next_step": step, "seed": self.seed, "global_batch_rows": self.rows_per_step}

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        per_rank = self.batch_size * self.grad_accum
        mine = self.global_rows(step)[self.rank * per_rank:(self.rank + 1) * per_rank]
        return [collate([self.examples[i] for i in mine[j:j + self.batch_size]], self.pad)
                for j in range(0, per_rank, self.batch_size)]


def validation_batches(examples: list[Example], batch_size: int, pad: int, rank: int = 0, world_size: int = 1
                       ) -> list[dict[str, torch.Tensor]]:
    """Every validation example once, in order; rank r takes every world_size-th batch."""
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    return [collate(b, pad) for b in batches[rank::world_size]]


__all__ = ["ClassifyBatches", "ClassifyDataConfig", "Example", "collate", "encode_examples", "label_names",
           "read_labelled", "resolve_label", "validation_batches"]
