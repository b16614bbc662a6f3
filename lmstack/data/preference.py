"""Preference data: pairs, unpaired examples and prompts for alignment, read from JSONL and rendered to ids.

Records (one JSON object per line; `.gz` is read as is):

    {"prompt": P, "chosen": C, "rejected": R [, "margin": m]}   a pair (DPO family, reward model)
    {"chosen": D1, "rejected": D2}                              a pair with an implicit prompt: two whole
                                                                dialogues (Anthropic HH "\\n\\nHuman: ..."
                                                                text, or lists of messages) that share
                                                                everything but the last assistant turn
    {"prompt": P, "completion": C, "label": true|false}         an unpaired example (KTO)
    {"prompt": P, ...}                                          a prompt for on-policy methods; the other
                                                                fields (e.g. "answer") go to reward functions

P, C and R are text or chat messages (lists of {"role", "content"}). Rendering (`Renderer`): with a chat
template the prompt is the conversation with the generation prompt appended and the completion is the
rest of the rendered conversation up to the end of the assistant turn (its end-of-turn marker included,
the separator after it not); without one, the prompt is the text (dialogue turns written HH-style) and
the completion is its text plus EOS. Only completion tokens are scored: `collate_pairs` sets every other
target to IGNORE_INDEX.

Bad records are counted, never silently trained on: a pair whose chosen and rejected completions are
identical, an empty completion and a prompt that leaves no room in `max_len` are skipped; a completion
that does not fit is cut at `max_len` (and counted). A malformed line is a DataError naming file:line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lmstack.data.ingest import open_maybe_gzip
from lmstack.errors import DataError
from lmstack.tokenizer import Tokenizer

IGNORE_INDEX = -100
Message = dict[str, str]
Turns = str | list[Message]
RenderFormat = Literal["auto", "chat", "text"]


# ------------------------------------------------------------------------------------------- records
@dataclass
class PreferencePair:
    """One prompt with a preferred and a dispreferred completion."""

    prompt: Turns
    chosen: Turns
    rejected: Turns
    source: str = ""  # file:line
    margin: float | None = None  # how much better chosen is (reward-model margin loss)


@dataclass
class UnpairedExample:
    """One prompt and completion labelled desirable or not (KTO)."""

    prompt: Turns
    completion: Turns
    label: bool
    source: str = ""


@dataclass
class PromptRecord:
    """A prompt for on-policy sampling; `fields` (e.g. the reference answer) are passed to reward functions."""

    prompt: Turns
    fields: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def read_jsonl(path: str | Path) -> Iterator[tuple[dict[str, Any], str]]:
    """(record, "file:line") for every non-blank line; a line that is not a JSON object is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open_maybe_gzip(path) as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{where}: not valid JSON ({getattr(e, 'msg', e)})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield record, where


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")


def parse_hh_dialogue(text: str, where: str = "") -> list[Message]:
    """Anthropic HH text ("\\n\\nHuman: ...\\n\\nAssistant: ...") -> chat messages (user / assistant)."""
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip("\n")
    parts = _HH_TURN.split(text)  # ["", role, content, role, content, ...]
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{where}: not an HH dialogue (expected '\\n\\nHuman: ...' / '\\n\\nAssistant: ...' turns)")
    return [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2])]


def _as_turns(value: Any, where: str, key: str) -> Turns:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                       and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{where}: {key!r} must be text or a list of {{'role', 'content'}} messages, "
                    f"got {type(value).__name__}")


def split_dialogues(chosen: Turns, rejected: Turns, where: str) -> tuple[list[Message], list[Message], list[Message]]:
    """Two whole dialogues (HH text or message lists) -> (shared prompt messages, chosen ending, rejected ending)."""
    c = parse_hh_dialogue(chosen, where) if isinstance(chosen, str) else chosen
    r = parse_hh_dialogue(rejected, where) if isinstance(rejected, str) else rejected
    n = 0
    while n < min(len(c), len(r)) and c[n] == r[n]:
        n += 1
    if n == len(c) or n == len(r):  # one dialogue contains the other: compare from the last shared turn
        n -= 1
    if n <= 0:
        raise DataError(f"{where}: chosen and rejected share no prompt turns")
    if c[n]["role"] != "assistant" or r[n]["role"] != "assistant":
        raise DataError(f"{where}: the dialogues differ at a {c[n]['role']!r} turn; a preference pair must differ "
                        "in the assistant's answer")
    return c[:n], c[n:], r[n:]


def _pair(record: dict[str, Any], where: str) -> PreferencePair:
    if "chosen" not in record or "rejected" not in record:
        raise DataError(f"{where}: a preference record needs 'chosen' and 'rejected' (and 'prompt', unless they "
                        f"are whole dialogues); got keys {sorted(record)}")
    chosen = _as_turns(record["chosen"], where, "chosen")
    rejected = _as_turns(record["rejected"], where, "rejected")
    margin = record.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise DataError(f"{where}: 'margin' must be a number, got {margin!r}")
    if "prompt" in record:
        prompt = _as_turns(record["prompt"], where, "prompt")
    else:
        prompt, chosen, rejected = split_dialogues(chosen, rejected, where)
    return PreferencePair(prompt, chosen, rejected, where, None if margin is None else float(margin))


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """Pairs from JSONL: explicit prompt/chosen/rejected, or HH-style whole dialogues (prompt implicit)."""
    pairs = [_pair(record, where) for record, where in read_jsonl(path)]
    if not pairs:
        raise DataError(f"{path}: no preference records")
    return pairs


def read_unpaired(path: str | Path) -> list[UnpairedExample]:
    """KTO examples: prompt/completion/label records; pair records are unpaired (chosen -> True, rejected -> False)."""
    examples = []
    for record, where in read_jsonl(path):
        if "completion" not in record:
            pair = _pair(record, where)
            examples += [UnpairedExample(pair.prompt, pair.chosen, True, where),
                         UnpairedExample(pair.prompt, pair.rejected, False, where)]
            continue
        label = record.get("label")
        if "prompt" not in record or not isinstance(label, bool):
            raise DataError(f"{where}: an unpaired record needs 'prompt', 'completion' and 'label' (true or false); "
                            f"got label {label!r}")
        examples.append(UnpairedExample(_as_turns(record["prompt"], where, "prompt"),
                                        _as_turns(record["completion"], where, "completion"), label, where))
    if not examples:
        raise DataError(f"{path}: no records")
    return examples


def read_prompts(path: str | Path, prompt_field: str = "prompt") -> list[PromptRecord]:
    """Prompt records for PPO / GRPO; `prompt_field` names the prompt (e.g. "question" for GSM8K)."""
    records = []
    for record, where in read_jsonl(path):
        if prompt_field not in record:
            raise DataError(f"{where}: no {prompt_field!r} field (keys: {sorted(record)}); set data.prompt_field")
        fields = {k: v for k, v in record.items() if k != prompt_field}
        records.append(PromptRecord(_as_turns(record[prompt_field], where, prompt_field), fields, where))
    if not records:
        raise DataError(f"{path}: no prompt records")
    return records


# ------------------------------------------------------------------------------------------- rendering
@dataclass
class EncodedPair:
    """Token ids of one pair: the prompt and the two completions (end-of-turn / EOS included)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    index: int = 0  # position among the kept pairs (keys the cached reference log-probabilities)
    margin: float | None = None

    @property
    def num_tokens(self) -> int:
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


@dataclass
class EncodedExample:
    """Token ids of one unpaired example (KTO) or one prompt with its completion."""

    prompt: list[int]
    completion: list[int]
    label: bool = True
    index: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.completion)


SKIP_REASONS = {"identical": "chosen and rejected completions are identical",
                "empty_completion": "a completion is empty",
                "prompt_too_long": "the prompt leaves no room for a completion within max_len"}


@dataclass
class EncodeStats:
    """What rendering kept, skipped (by reason) and truncated; `first` holds the first record of each kind."""

    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    first: dict[str, str] = field(default_factory=dict)

    def note(self, kind: str, source: str) -> None:
        if kind == "truncated":
            self.truncated += 1
        else:
            self.skipped[kind] = self.skipped.get(kind, 0) + 1
        self.first.setdefault(kind, source)

    def summary(self) -> str:
        parts = [f"{self.kept} kept"]
        for kind, n in sorted(self.skipped.items()):
            parts.append(f"{n} skipped: {SKIP_REASONS[kind]} (first: {self.first[kind]})")
        if self.truncated:
            parts.append(f"{self.truncated} completions cut at max_len (first: {self.first['truncated']})")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "skipped": dict(self.skipped), "truncated": self.truncated}


class Renderer:
    """Prompts and completions -> token ids, through the chat template ("chat") or as plain text ("text")."""

    def __init__(self, tokenizer: Tokenizer, max_len: int, format: RenderFormat = "auto"):
        if format not in ("auto", "chat", "text"):
            raise DataError(f"data.format must be auto, chat or text, got {format!r}")
        self.tokenizer, self.max_len = tokenizer, max_len
        self.chat = format == "chat" or (format == "auto" and tokenizer.chat_template is not None)
        if self.chat and tokenizer.chat_template is None:
            raise DataError("data.format is 'chat' but the tokenizer has no chat_template")
        self.eos = tokenizer.eos_token_id

    # --------------------------------------------------------------- prompts
    def prompt_ids(self, prompt: Turns) -> list[int]:
        if self.chat:
            text = self.tokenizer.apply_chat_template(_messages(prompt, "user"), add_generation_prompt=True)
        else:
            text = plain_prompt(prompt)
        return self.tokenizer.encode(text)

    def completion_ids(self, prompt: Turns, prompt_ids: list[int], completion: Turns) -> tuple[list[int], list[int]]:
        """-> (the prompt ids as they appear before the completion, the completion ids)."""
        if not self.chat:
            ids = self.tokenizer.encode(plain_completion(completion))
            return prompt_ids, ids + ([self.eos] if self.eos is not None else [])
        full, mask = self.tokenizer.render_chat(_messages(prompt, "user") + _messages(completion, "assistant"))
        start = _common_prefix(prompt_ids, full)  # < len(prompt_ids) only where tokens merge across the boundary
        ends = [t for t in range(start, len(full)) if mask[t]]
        end = ends[-1] + 1 if ends else start  # up to the end-of-turn marker; the separator after it is not trained
        return full[:start], full[start:end]

    def is_empty(self, completion: Turns) -> bool:
        text = completion if isinstance(completion, str) else "".join(m["content"] for m in completion)
        return not text.strip()

    def fit(self, prompt: list[int], completion: list[int], source: str, stats: EncodeStats) -> list[int] | None:
        """The completion cut to fit max_len (counted), or None when the prompt leaves no room."""
        room = self.max_len - len(prompt)
        if room < 1:
            stats.note("prompt_too_long", source)
            return None
        if len(completion) > room:
            stats.note("truncated", source)
            return completion[:room]
        return completion

    # --------------------------------------------------------------- records
    def encode_pairs(self, pairs: Sequence[PreferencePair], first_index: int = 0
                     ) -> tuple[list[EncodedPair], EncodeStats]:
        """Kept pairs numbered from `first_index` (the key of cached reference log-probabilities), and the counts."""
        stats, out = EncodeStats(), []
        for pair in pairs:
            if self.is_empty(pair.chosen) or self.is_empty(pair.rejected):
                stats.note("empty_completion", pair.source)
                continue
            prompt_ids = self.prompt_ids(pair.prompt)
            p_c, chosen = self.completion_ids(pair.prompt, prompt_ids, pair.chosen)
            p_r, rejected = self.completion_ids(pair.prompt, prompt_ids, pair.rejected)
            prompt = p_c[:_common_prefix(p_c, p_r)]
            chosen, rejected = p_c[len(prompt):] + chosen, p_r[len(prompt):] + rejected
            if not chosen or not rejected:  # the template rendered nothing for an answer
                stats.note("empty_completion", pair.source)
                continue
            if chosen == rejected:
                stats.note("identical", pair.source)
                continue
            if len(prompt) >= self.max_len:
                stats.note("prompt_too_long", pair.source)
                continue
            cut_chosen = self.fit(prompt, chosen, pair.source, stats)
            cut_rejected = self.fit(prompt, rejected, pair.source, stats)
            if cut_chosen == cut_rejected:  # identical within max_len: nothing to prefer
                stats.note("identical", pair.source)
                continue
            out.append(EncodedPair(prompt, cut_chosen, cut_rejected, first_index + len(out), pair.margin))
        stats.kept = len(out)
        return out, stats

    def encode_unpaired(self, examples: Sequence[UnpairedExample], first_index: int = 0
                        ) -> tuple[list[EncodedExample], EncodeStats]:
        stats, out = EncodeStats(), []
        for ex in examples:
            if self.is_empty(ex.completion):
                stats.note("empty_completion", ex.source)
                continue
            prompt, completion = self.completion_ids(ex.prompt, self.prompt_ids(ex.prompt), ex.completion)
            completion = self.fit(prompt, completion, ex.source, stats)
            if completion is None:
                continue
            out.append(EncodedExample(prompt, completion, ex.label, first_index + len(out)))
        stats.kept = len(out)
        return out, stats


def _messages(turns: Turns, role: str) -> list[Message]:
    return [{"role": role, "content": turns}] if isinstance(turns, str) else list(turns)


def plain_prompt(prompt: Turns) -> str:
    """A text prompt as is; a conversation HH-style, ending where the assistant's answer starts."""
    if isinstance(prompt, str):
        return prompt
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names.get(m['role'], m['role'].title())}: {m['content']}" for m in prompt) + "\n\nAssistant:"


def plain_completion(completion: Turns) -> str:
    if isinstance(completion, str):
        return completion
    return " " + "\n\n".join(m["content"] for m in completion)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ------------------------------------------------------------------------------------------- batches
def _pad_rows(rows: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids (N, T), attention mask, and next-token targets scored from `starts[i]` on.

    targets[i, t] = ids[i, t + 1] for t + 1 >= starts[i] (a completion token), IGNORE_INDEX elsewhere.
    """
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, starts)):
        row_t = torch.tensor(row, dtype=torch.long)
        ids[i, :len(row)] = row_t
        mask[i, :len(row)] = 1
        targets[i, start - 1:len(row) - 1] = row_t[start:]
    return {"input_ids": ids, "attention_mask": mask, "targets": targets}


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one batch of 2B rows: the B chosen sequences, then the B rejected ones (same order).

    input_ids / attention_mask / targets (2B, T); index (B,) the pairs' positions; margin (B,) when any
    pair carries one (0 for the others).
    """
    rows = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    starts = [len(p.prompt) for p in pairs] * 2
    batch = _pad_rows(rows, starts, pad_id)
    batch["index"] = torch.tensor([p.index for p in pairs], dtype=torch.long)
    if any(p.margin is not None for p in pairs):
        batch["margin"] = torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)
    return batch


def collate_unpaired(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """B unpaired examples -> rows (B, T) with `labels` (B,), plus the KL rows: prompt i with completion i-1
    (the completions rotated by one within the batch, as trl's KTO does), for KTO's reference-point estimate."""
    batch = _pad_rows([e.prompt + e.completion for e in examples], [len(e.prompt) for e in examples], pad_id)
    shifted = [examples[-1].completion] + [e.completion for e in examples[:-1]]
    kl = _pad_rows([e.prompt + c for e, c in zip(examples, shifted)], [len(e.prompt) for e in examples], pad_id)
    batch.update({f"kl_{k}": v for k, v in kl.items()})
    batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
    batch["index"] = torch.tensor([e.index for e in examples], dtype=torch.long)
    return batch


def collate_completions(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """B prompts with completions -> input_ids / attention_mask / targets (B, T), targets on the completion only
    (supervised fine-tuning on demonstrations: the prompt is context, not something to learn)."""
    batch = _pad_rows([e.prompt + e.completion for e in examples], [len(e.prompt) for e in examples], pad_id)
    batch["index"] = torch.tensor([e.index for e in examples], dtype=torch.long)
    return batch


class ExampleBatches:
    """Training batches over a fixed list of examples: a pure function of the optimizer step.

    Step s takes the next `batch_size * grad_accum * world_size` examples of an endless stream that visits
    every example once per epoch in an order shuffled per epoch from the seed; this rank's share is split
    into `grad_accum` micro-batches of `batch_size`, each turned into tensors by `collate`.
    """

    def __init__(self, examples: Sequence[Any], collate: Callable[[list[Any]], dict[str, torch.Tensor]],
                 batch_size: int, grad_accum: int = 1, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not examples:
            raise DataError("no training examples left after rendering (see the counts above)")
        self.examples, self.collate = list(examples), collate
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.rank, self.world_size = rank, world_size
        self.per_step = batch_size * grad_accum * world_size
        mean_tokens = float(np.mean([e.num_tokens for e in self.examples]))
        self.tokens_per_step = int(round(mean_tokens * self.per_step))
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))}
        return self._orders[epoch]

    def indices(self, step: int) -> list[int]:
        """Example indices of this rank's share of `step`."""
        n = len(self.examples)
        first = step * self.per_step + self.rank * self.batch_size * self.grad_accum
        out = []
        for i in range(first, first + self.batch_size * self.grad_accum):
            epoch, position = divmod(i, n)
            out.append(int(self._order(epoch)[position]))
        return out

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        chosen = self.indices(step)
        return [self.collate([self.examples[i] for i in chosen[k:k + self.batch_size]])
                for k in range(0, len(chosen), self.batch_size)]

    def state_dict(self, step: int) -> dict[str, Any]:
        return {"next_step": step, "seed": self.seed, "examples": len(self.examples), "examples_per_step": self.per_step}


def fixed_batches(examples: Sequence[Any], collate: Callable[[list[Any]], dict[str, torch.Tensor]],
                  batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Every example once, in order, in batches of `batch_size` (validation)."""
    return [collate(list(examples[i:i + batch_size])) for i in range(0, len(examples), batch_size)]


def split_holdout(items: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held-out): a seeded random `fraction` of the items held out (none when fraction is 0)."""
    n_out = int(round(len(items) * fraction))
    order = np.random.default_rng(seed).permutation(len(items))
    held = set(order[:n_out].tolist())
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


__all__ = ["EncodeStats", "EncodedExample", "EncodedPair", "ExampleBatches", "IGNORE_INDEX", "PreferencePair",
           "PromptRecord", "Renderer", "UnpairedExample", "collate_pairs", "collate_completions", "collate_unpaired", "fixed_batches",
           "parse_hh_dialogue", "plain_completion", "plain_prompt", "read_jsonl", "read_pairs", "read_prompts", "read_unpaired", "split_dialogues",
           "split_holdout"]
