"""Instruction data for supervised fine-tuning: read records, render them with the chat template, mask
everything but the assistant's tokens, and batch them (packed or padded).

Records (one JSON array, or JSONL; .gz allowed), each normalised to chat messages:
    alpaca             {"instruction", "input" (optional), "output"}       -> user / assistant
    chat               {"messages": [{"role", "content"}, ...]}
    sharegpt           {"conversations": [{"from": human|gpt|system, "value"}, ...]}
    prompt_completion  {"prompt", "completion"}                            -> user / assistant

Each conversation is rendered with the tokenizer's chat template; the loss covers exactly the tokens the
template marks as assistant output (`Tokenizer.render_chat`, equal to transformers'
`return_assistant_tokens_mask`). The mistakes other trainers make are checked here, per sample:
  - every assistant turn must end with an end-of-turn token (eos, <|im_end|>, <|eot_id|>, ...) and that token
    is in the loss (the mask is not derived from the pad id, so pad == eos cannot hide it);
  - no doubled BOS (the template writes BOS; nothing adds a second one);
  - a template that marks no assistant token is an error, never a run that trains on nothing;
  - a sample longer than the context is dropped, truncated or refused (`overlong`), and counted.

Packing puts several samples in one row: positions restart at each sample and attention stays inside it
(the attention mask holds a segment id per token: 1, 2, ... for the samples of a row, 0 for padding).

Shapes: B rows, T tokens per row.
"""

from __future__ import annotations

import bisect
import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lmstack.errors import ChatTemplateError, DataError, InputFileError

IGNORE_INDEX = -100
Format = Literal["auto", "alpaca", "chat", "sharegpt", "prompt_completion"]
Overlong = Literal["drop", "truncate", "error"]
# Tokens that end an assistant turn in the common templates (ChatML, Llama 3, Phi, SentencePiece) besides eos.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                   "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}


@dataclass
class SFTDataConfig:
    """The `data:` section of a fine-tuning config."""

    train: list[str] | str = field(default_factory=list)  # JSON / JSONL files, or builtin:instruct-tasks
    val: list[str] | str = field(default_factory=list)  # held-out files; empty: `val_fraction` of train
    val_fraction: float = 0.0
    format: Format = "auto"  # auto: decided per record from its keys
    chat_template: str | None = None  # null: the tokenizer's; chatml | llama3 | a Jinja file (tokens added if missing)
    system: str | None = None  # a system message put before every conversation that has none
    pack: bool = True
    overlong: Overlong = "drop"  # a sample longer than train.seq_len + 1 tokens
    max_samples: int | None = None  # use only the first N records (builtin tasks: how many to generate)
    seed: int = 0  # the validation split and the builtin task generator

    def __post_init__(self) -> None:
        if isinstance(self.train, str):
            self.train = [self.train]
        if isinstance(self.val, str):
            self.val = [self.val]
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")


# ------------------------------------------------------------------------------------------- reading
def read_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for each record of a JSON array or JSONL file; where = "file:line" or "file[i]"."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputFileError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        for i, record in enumerate(records):
            yield f"{path}[{i}]", record
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        yield f"{path}:{number}", record


def to_messages(record: Any, where: str, fmt: Format = "auto", system: str | None = None) -> list[dict[str, str]]:
    """One record -> chat messages; a record without the fields of its format is a DataError naming `where`."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = next((f for f, keys in (("chat", ("messages",)), ("sharegpt", ("conversations",)),
                                      ("alpaca", ("instruction", "output")), ("prompt_completion", ("prompt", "completion")))
                    if all(k in record for k in keys)), None)
        if fmt is None:
            raise DataError(f"{where}: a record needs \"messages\", \"conversations\", \"instruction\" + \"output\", "
                            f"or \"prompt\" + \"completion\"; it has {sorted(record)}")
    if fmt == "alpaca":
        instruction, extra = _text(record, "instruction", where), record.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: \"input\" must be a string")
        messages = [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra.strip() else "")},
                    {"role": "assistant", "content": _text(record, "output", where)}]
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": _text(record, "prompt", where)},
                    {"role": "assistant", "content": _text(record, "completion", where)}]
    elif fmt == "chat":
        messages = _turns(record.get("messages"), where, "messages", "role", "content", None)
    else:
        messages = _turns(record.get("conversations"), where, "conversations", "from", "value", _SHAREGPT_ROLES)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn: nothing to learn from this record")
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise DataError(f"{where}: \"{key}\" must be a string, got {type(value).__name__ if key in record else 'nothing'}")
    return value


def _turns(turns: Any, where: str, key: str, role_key: str, text_key: str, roles: dict | None) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: \"{key}\" must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(role_key), str) or not isinstance(turn.get(text_key), str):
            raise DataError(f"{where}: {key}[{i}] needs string \"{role_key}\" and \"{text_key}\"")
        role = turn[role_key] if roles is None else roles.get(turn[role_key].lower())
        if role not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{where}: {key}[{i}] has an unknown role {turn[role_key]!r}")
        messages.append({"role": role, "content": turn[text_key]})
    return messages


# ------------------------------------------------------------------------------------------- encoding
@dataclass
class Sample:
    ids: list[int]  # the rendered conversation (L,)
    mask: list[int]  # (L,) 1 where the token is assistant output, trained on


@dataclass
class EncodeStats:
    records: int = 0
    samples: int = 0
    tokens: int = 0
    assistant_tokens: int = 0
    dropped_overlong: int = 0
    truncated: int = 0
    doubled_bos_removed: int = 0

    def report(self) -> str:
        return (f"{self.samples:,} samples from {self.records:,} records, {self.tokens:,} tokens "
                f"({self.assistant_tokens:,} in the loss); overlong: {self.dropped_overlong:,} dropped, "
                f"{self.truncated:,} truncated")


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    ids = {tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS} | {tokenizer.eos_token_id}
    return {i for i in ids if i is not None}


def encode(tokenizer: Any, messages: list[dict[str, str]], where: str, stats: EncodeStats | None = None) -> Sample:
    """Render and tokenise one conversation, with its assistant mask; checks every assistant turn ends with an
    end-of-turn token that is inside the mask (so the model learns to stop)."""
    ids, mask = tokenizer.render_chat(messages)
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
        ids, mask = ids[1:], mask[1:]
        if stats is not None:
            stats.doubled_bos_removed += 1
    if not any(mask):
        raise ChatTemplateError(f"{where}: the chat template marked no assistant token, so this sample would train "
                                "on nothing; use a template that wraps assistant output in {% generation %}... "
                                "{% endgeneration %} (or whose renders of shorter conversations are prefixes), e.g. "
                                "data.chat_template: chatml")
    stops = end_of_turn_ids(tokenizer)
    for t in range(len(ids)):
        if mask[t] and (t + 1 == len(ids) or not mask[t + 1]) and ids[t] not in stops:
            raise ChatTemplateError(
                f"{where}: an assistant turn ends with token {tokenizer.id_to_token(ids[t])!r}, not an end-of-turn "
                f"token ({', '.join(tokenizer.id_to_token(i) for i in sorted(stops)) or 'the tokenizer has none'}): "
                "a model trained on it would never learn to stop. Use a template that closes each assistant turn "
                "with eos or an end-of-turn marker inside the assistant span (chatml, llama3)")
    return Sample(ids, mask)


def encode_records(tokenizer: Any, records: Sequence[tuple[str, dict]], max_len: int, cfg: SFTDataConfig
                   ) -> tuple[list[Sample], EncodeStats]:
    """Records -> samples of at most `max_len` + 1 tokens (max_len inputs and targets), per `cfg.overlong`."""
    stats = EncodeStats()
    samples = []
    for where, record in records:
        stats.records += 1
        sample = encode(tokenizer, to_messages(record, where, cfg.format, cfg.system), where, stats)
        if len(sample.ids) - 1 > max_len:
            if cfg.overlong == "error":
                raise DataError(f"{where}: {len(sample.ids)} tokens, longer than the context ({max_len} + 1); raise "
                                "train.seq_len (up to the model's max_seq_len), or set data.overlong: drop | truncate")
            if cfg.overlong == "truncate" and any(sample.mask[1:max_len + 1]):
                sample = Sample(sample.ids[:max_len + 1], sample.mask[:max_len + 1])
                stats.truncated += 1
            else:
                stats.dropped_overlong += 1
                continue
        stats.samples += 1
        stats.tokens += len(sample.ids)
        stats.assistant_tokens += sum(sample.mask[1:])
        samples.append(sample)
    return samples, stats


def sample_tensors(sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample -> inputs (L-1,) and targets (L-1,): the next token where it is assistant output, else -100."""
    ids = torch.tensor(sample.ids, dtype=torch.long)
    mask = torch.tensor(sample.mask, dtype=torch.bool)
    targets = torch.where(mask[1:], ids[1:], torch.full_like(ids[1:], IGNORE_INDEX))
    return ids[:-1], targets


# ------------------------------------------------------------------------------------------- packing and batches
def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: sample indices grouped into rows of at most `capacity` tokens (longest first,
    each into the fullest row it still fits). Rows come out in creation order."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, row index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        need = lengths[i]
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(i)
            bisect.insort(free, (space - need, row))
        else:
            rows.append([i])
            bisect.insort(free, (capacity - need, len(rows) - 1))
    return rows


def collate(samples: Sequence[Sample], rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Rows of sample indices -> a batch padded to its longest row:
    input_ids, targets (-100 off the loss), attention_mask (segment id per token, 0 = padding), position_ids
    (restarting at each sample), all (B, T)."""
    pieces = [[sample_tensors(samples[i]) for i in row] for row in rows]
    width = max(sum(len(x) for x, _ in row) for row in pieces)
    B = len(rows)
    input_ids = torch.zeros(B, width, dtype=torch.long)
    targets = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    segments = torch.zeros(B, width, dtype=torch.long)
    positions = torch.zeros(B, width, dtype=torch.long)
    for b, row in enumerate(pieces):
        t = 0
        for segment, (x, y) in enumerate(row, 1):
            n = len(x)
            input_ids[b, t:t + n], targets[b, t:t + n] = x, y
            segments[b, t:t + n] = segment
            positions[b, t:t + n] = torch.arange(n)
            t += n
    return {"input_ids": input_ids, "targets": targets, "attention_mask": segments, "position_ids": positions}


class SFTBatches:
    """The engine's batch source for SFT: a pure function of (seed, step, rank).

    Epoch e shuffles the samples with a generator seeded by (seed, e), then packs them into rows of
    `seq_len` tokens (or one sample per row); the global batch of step s is the next
    batch_size * grad_accum * world_size rows of the endless sequence of epochs, rank r taking its slice.
    """

    def __init__(self, samples: list[Sample], seq_len: int, batch_size: int, grad_accum: int = 1, pack_rows: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if not samples:
            raise DataError("no training samples left (every record was dropped or the files are empty)")
        self.samples, self.seq_len, self.batch_size, self.grad_accum = samples, seq_len, batch_size, grad_accum
        self.pack_rows, self.seed, self.rank, self.world_size = pack_rows, seed, rank, world_size
        self.lengths = [len(s.ids) - 1 for s in samples]
        self._epochs: dict[int, list[list[int]]] = {}
        self.rows_per_epoch = len(self.epoch_rows(0))
        self.rows_per_step = batch_size * grad_accum * world_size
        self.tokens_per_step = round(self.rows_per_step * sum(self.lengths) / self.rows_per_epoch)

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.samples)).tolist()
            if self.pack_rows:
                rows = [[order[i] for i in row] for row in pack([self.lengths[i] for i in order], self.seq_len)]
                rows = [rows[i] for i in rng.permutation(len(rows))]
            else:
                rows = [[i] for i in order]
            self._epochs = {epoch: rows}  # one epoch cached: steps move forward
        return self._epochs[epoch]

    def steps_per_epoch(self) -> float:
        return self.rows_per_epoch / self.rows_per_step

    def global_rows(self, step: int) -> list[list[int]]:
        start = step * self.rows_per_step
        out = []
        while len(out) < self.rows_per_step:
            epoch, offset = divmod(start + len(out), self.rows_per_epoch)
            rows = self.epoch_rows(epoch)
            out.extend(rows[offset:offset + self.rows_per_step - len(out)])
        return out

    def state_dict(self, step: int) -> dict[str, int]:
        return {"next_step": step, "seed": self.seed, "seq_len": self.seq_len, "global_batch_windows": self.rows_per_step}

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        per_rank = self.batch_size * self.grad_accum
        mine = self.global_rows(step)[self.rank * per_rank:(self.rank + 1) * per_rank]
        return [collate(self.samples, mine[i:i + self.batch_size]) for i in range(0, per_rank, self.batch_size)]


def validation_batches(samples: list[Sample], seq_len: int, batch_size: int, pack_rows: bool = True, rank: int = 0,
                       world_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """Every validation sample once, in fixed rows; rank r takes every world_size-th batch (rows left over
    when the batches do not split evenly are dropped, so every rank runs the same number of steps)."""
    lengths = [len(s.ids) - 1 for s in samples]
    rows = pack(lengths, seq_len) if pack_rows else [[i] for i in range(len(samples))]
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    usable = len(batches) // world_size * world_size or len(batches)
    return [collate(samples, b) for b in batches[rank:usable:world_size]]


__all__ = ["END_OF_TURN_TOKENS", "IGNORE_INDEX", "EncodeStats", "SFTBatches", "SFTDataConfig", "Sample", "collate",
           "encode", "encode_records", "end_of_turn_ids", "pack", "read_records", "sample_tensors", "to_messages",
           "validation_batches"]
