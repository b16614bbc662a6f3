"""Requests that join and leave a running batch, one decode step at a time: what a scheduler drives.

    with ContinuousBatch(model, tokenizer, rows=8, cache_len=1024, compile=True) as batch:
        row = batch.add(prompt_ids, config)   # prefilled now; its first token comes with the next step
        events = batch.step()                 # one token for every running row: [StreamEvent, ...]
        batch.sequence(row)                   # its ids, text, logprobs and finish_reason so far
        batch.release(row)                    # finished or abandoned: the row and its cache are free again

Each request has its own GenerationConfig (sampling settings, penalties, stop strings, max_new_tokens,
logprobs) and, when it samples, its own seeded random stream, so its tokens do not depend on which other
requests share the batch. `add_group` adds several prompts as one request (an offline batch: that is how
`generate` runs): one config, one random stream drawn for the whole group at once, as a batched
`generate` always drew.

A step decodes the tokens chosen at the previous step (only the rows up to the highest in use, over the
slots they hold: a view of the session's caches, whose width is read on the host), chooses the next token
of every running row from its logits, and synchronises with the host once more to push them into the
sequences (stop test, text, events). A row added between two steps has its prefill's logits instead: the
decode leaves it alone (it does not advance) and its first token is chosen with the others'.

Shapes: R rows, G rows of one request, S cache slots, V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

import torch

from lmstack.errors import GenerationError
from lmstack.generate.config import GenerationConfig
from lmstack.generate.prompts import TokenizerLike
from lmstack.generate.results import StreamEvent
from lmstack.generate.sampling import TokenCounts, make_generator, next_tokens, token_logprobs
from lmstack.generate.session import DecodeSession
from lmstack.generate.stopping import SequenceState, resolve_eos_ids
from lmstack.model.protocol import CausalLM


@dataclass
class _Request:
    """Rows added together under one config."""

    rows: list[int]
    config: GenerationConfig
    generator: torch.Generator | None
    counts: TokenCounts | None  # (G, V) statistics for the penalties, or None without penalties
    index: torch.Tensor  # (G,) the rows on the device

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This request's rows of a (R, ...) tensor: a view when they are consecutive (a whole offline batch)."""
        first = self.rows[0]
        if self.rows == list(range(first, first + len(self.rows))):
            return tensor[first:first + len(self.rows)]
        return tensor.index_select(0, self.index)


class ContinuousBatch:
    """A DecodeSession of `rows` rows x `cache_len` slots whose rows are requests that come and go."""

    def __init__(self, model: CausalLM, tokenizer: TokenizerLike | None, rows: int, cache_len: int,
                 compile: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.session = DecodeSession(model, rows, cache_len, compile)
        self.decode_steps = 0  # decode calls so far
        self.synced_at = 0.0  # perf_counter() when the last step's tokens reached the host
        self._sequences: list[SequenceState | None] = [None] * rows  # None = free row
        self._requests: list[_Request] = []
        self._logits: torch.Tensor | None = None  # (R, V) each row's next-token logits
        self._tokens = torch.zeros(rows, dtype=torch.long, device=self.session.device)  # (R,) chosen, not yet decoded
        self._fresh: set[int] = set()  # rows prefilled whose first token is not chosen yet
        self._pending: set[int] = set()  # rows whose chosen token the next step decodes

    def __enter__(self) -> Self:
        self.session.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.session.__exit__(*exc)

    # ------------------------------------------------------------------------------ joining and leaving
    @property
    def free_rows(self) -> list[int]:
        return [row for row, s in enumerate(self._sequences) if s is None]

    def has_running(self) -> bool:
        """Whether any row still generates."""
        return any(s is not None and not s.finished for s in self._sequences)

    def sequence(self, row: int) -> SequenceState:
        """The request in `row`: ids, text, logprobs and finish_reason so far."""
        sequence = self._sequences[row]
        if sequence is None:
            raise GenerationError(f"row {row} holds no request")
        return sequence

    def add(self, prompt_ids: Sequence[int], config: GenerationConfig) -> int:
        """Prefill one request into a free row and return the row; it generates from the next step on."""
        return self.add_group([prompt_ids], config)[0]

    def add_group(self, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                  prefix: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[int]:
        """Prefill several prompts as one request (one config, one random stream) into free rows (the lowest,
        so that a fresh batch's rows run in order and prefill together).

        prefix: the keys/values of the prompts' first n tokens (DecodeSession.read_slots, a server's prefix
        cache): written into the rows, and only the rest of each prompt is computed."""
        return self.add_groups([(prompts, config)], prefix)[0]

    def check(self, prompts: Sequence[Sequence[int]], config: GenerationConfig) -> None:
        """Raise GenerationError if these prompts cannot join under `config` (empty, too long, bad ids)."""
        if config.stop and self.tokenizer is None:
            raise GenerationError("stop strings are matched on decoded text: give the batch a tokenizer")
        vocab, S = self.model.config.vocab_size, self.session.cache_len
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise GenerationError(f"prompt {i} is empty: give at least one token")
            if len(prompt) >= S:
                raise GenerationError(f"prompt {i} has {len(prompt)} tokens but a row holds {S}: no room to generate")
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise GenerationError(f"prompt {i} holds token id {bad}, outside the model's vocabulary (size {vocab})")

    def add_groups(self, groups: Sequence[tuple[Sequence[Sequence[int]], GenerationConfig]],
                   prefix: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> list[list[int]]:
        """Several requests at once, each a group of prompts under its own config: their prompts are prefilled
        in one model call (a server admitting every request that arrived during a step), then each request
        is registered as `add_group` would. Returns each group's rows. `prefix`, when given, heads every prompt."""
        free = self.free_rows
        total = sum(len(prompts) for prompts, _ in groups)
        if total > len(free):
            raise GenerationError(f"{total} prompts but {len(free)} free rows of {self.session.rows}: "
                                  "wait for a request to finish or release one")
        for prompts, config in groups:
            self.check(prompts, config)
        rows = free[:total]
        start = 0
        if prefix is not None:
            start = prefix[0][0].shape[1]
            self.session.write_slots(rows, prefix)
        everything = [prompt for prompts, _ in groups for prompt in prompts]
        logits = self.session.prefill(everything, rows, start)  # (G, V) over every group
        self.session.set_running(rows, False)  # until its first token is chosen, a decode must not advance it
        device, S = self.session.device, self.session.cache_len
        if self._logits is None:
            self._logits = torch.zeros(self.session.rows, logits.shape[-1], device=device)
        self._logits.index_copy_(0, torch.tensor(rows, device=device), logits)
        out, first = [], 0
        for prompts, config in groups:
            group = rows[first:first + len(prompts)]
            eos_ids = resolve_eos_ids(self.model, self.tokenizer, config)
            for row, prompt in zip(group, prompts):
                room = min(config.max_new_tokens, S - len(prompt))  # a full row finishes early: "length"
                self._sequences[row] = SequenceState(self.tokenizer, prompt, eos_ids, config.stop, room)
            counts = TokenCounts.from_prompts([list(p) for p in prompts], logits.shape[-1], device) \
                if config.uses_penalties else None
            index = torch.tensor(group, device=device)
            self._requests.append(_Request(group, config, make_generator(config, device), counts, index))
            out.append(group)
            first += len(prompts)
        self._fresh.update(rows)
        return out

    def release(self, row: int) -> None:
        """Free `row` (finished or not): its request stops there, and the next `add` may take the row."""
        self.sequence(row)  # a clear error for a free row
        for request in self._requests:
            if row in request.rows:
                keep = [i for i, r in enumerate(request.rows) if r != row]
                if not keep:
                    self._requests.remove(request)
                    break
                request.rows = [request.rows[i] for i in keep]
                request.index = torch.tensor(request.rows, device=self.session.device)
                if request.counts is not None:
                    request.counts.reorder(torch.tensor(keep, device=self.session.device))
                break
        self._sequences[row] = None
        self._fresh.discard(row)
        self._pending.discard(row)
        self.session.release(row)

    # ------------------------------------------------------------------------------ one step
    def step(self) -> list[StreamEvent]:
        """Decode the tokens chosen last step, choose every running row's next token, push them into their
        sequences; return one event per row that got a token."""
        if not self._pending and not self._fresh:
            return []
        if self._pending:
            # Rows past the highest one in use hold nothing: a partly empty pool decodes only up to there.
            live = 1 + max(r for r, s in enumerate(self._sequences) if s is not None)
            logits = self.session.decode(self._tokens, live)  # (live, V)
            self.decode_steps += 1
            if self._fresh:  # rows prefilled since: their next-token logits are the prefill's
                fresh = torch.tensor(sorted(self._fresh), device=logits.device)
                logits.index_copy_(0, fresh, self._logits.index_select(0, fresh))
            if logits.shape[0] == self.session.rows:
                self._logits = logits
            else:
                self._logits[:logits.shape[0]] = logits
        chosen: list[tuple[_Request, torch.Tensor, tuple | None]] = []
        for request in self._requests:
            if all(self._sequences[r].finished for r in request.rows):
                continue
            logits = request.take(self._logits)  # (G, V)
            tokens = next_tokens(logits, request.config, request.counts, request.generator)  # (G,)
            self._tokens.index_copy_(0, request.index, tokens)
            config = request.config
            logprobs = token_logprobs(logits, tokens, config.top_logprobs) \
                if config.logprobs or config.top_logprobs else None
            chosen.append((request, tokens, logprobs))
        host_tokens = self._tokens.tolist()  # the one sync per step: the stop test needs the ids
        self.synced_at = time.perf_counter()
        return self._push(host_tokens, chosen)

    def _push(self, host_tokens: list[int], chosen: list[tuple[_Request, torch.Tensor, tuple | None]]
              ) -> list[StreamEvent]:
        events, started, finished = [], [], []
        for request, tokens, logprobs in chosen:
            values = [None if t is None else t.tolist() for t in logprobs] if logprobs is not None else [None] * 3
            chosen_lp, top_values, top_ids = values
            for i, row in enumerate(request.rows):
                sequence = self._sequences[row]
                if sequence.finished:
                    continue
                top = dict(zip(top_ids[i], top_values[i])) if top_ids is not None else None
                piece = sequence.push(host_tokens[row], chosen_lp[i] if chosen_lp is not None else None, top)
                events.append(StreamEvent(row, host_tokens[row], piece, sequence.finished))
                if sequence.finished:
                    finished.append(row)
                elif row in self._fresh:
                    started.append(row)
            if request.counts is not None:
                request.counts.add(tokens)
        if started:
            self.session.set_running(started, True)
        if finished:
            self.session.set_running(finished, False)
        self._fresh.clear()
        self._pending = {r for r, s in enumerate(self._sequences) if s is not None and not s.finished}
        return events
