"""The decode session: a static KV cache of R rows x S slots, and the model calls that read and write it.

Every strategy drives the model through a session: sampling (through lmstack.generate.continuous, which a
server's scheduler drives too), beam search and speculative decoding.

    prefill(prompts, rows): prompt ids -> each row's slots [0, len) filled; logits of its last token (n, V)
    decode(tokens):         one token per row (R,) written at that row's next slot -> logits (R, V)
    score(tokens):          T tokens per row (R, T) at its next T slots -> logits (R, T, V)
    advance / set_running / reorder / release: the bookkeeping between those calls

Each row has its own length: its tokens fill slots [0, length) with no padding, so the rows of one batch
sit at different positions and a row can take a new request while the others keep running. A token
written at slot s has position s and attends to the slots <= s of its row. The model builds that mask and
the RoPE positions from the per-row slots, so the session keeps no (R, S) mask, and whatever an earlier
request left in a row's later slots is never seen.

A decode step always has the same shapes: tokens (R, 1) at slots (R, 1) over the same cache, and no Python
branch on tensor values. So `torch.compile` compiles it once per (R, S) and reuses it, whichever rows are
running and wherever they are. The session never synchronises with the host; its callers do, where they
need values (the stop test).

Shapes: R rows, S cache slots, P padded prompt length, T scored tokens, d width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Self

import torch

from lmstack.device import autocast, resolve_precision
from lmstack.errors import GenerationError
from lmstack.generate.compiled import compiled_for, keep_cache, take_cache
from lmstack.generate.prompts import right_pad
from lmstack.model.protocol import CausalLM, model_device


def _autocast(device: torch.device) -> Any:
    """The one precision policy (lmstack.device): bf16 autocast on CUDA, plain fp32 on the CPU."""
    return autocast(device, resolve_precision("auto", device))


def decode_step(model: CausalLM, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """One token per row: tokens (R, 1) written at slots (R, 1), each at the position of its slot -> logits
    (R, V) fp32. Static shapes and no Python branching on tensor values: this is what `torch.compile` compiles."""
    with torch.no_grad(), _autocast(tokens.device):
        return model(tokens, position_ids=slots, cache_slots=slots)[:, -1].float()  # (R, V)


def score_tokens(model: CausalLM, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Several tokens per row: tokens (R, T) written at slots (R, T) -> logits (R, T, V) fp32."""
    with torch.no_grad(), _autocast(tokens.device):
        return model(tokens, position_ids=slots, cache_slots=slots).float()


def _window(cache: Any, first: int, stop: int, slots: int) -> Any:
    """A view of a layer's cache: rows [first, stop), slots [0, slots); writes go to the cache's memory."""
    view = cache.rows(first, stop)
    view.k, view.v = view.k[:, :, :slots], view.v[:, :, :slots]
    return view


def _round_slots(needed: int, cache_len: int) -> int:
    """Slots a windowed call attends over: `needed` rounded up to a multiple of 64, at most the cache."""
    return min(cache_len, -(-needed // 64) * 64)


def cache_length(prompt_len: int, max_new_tokens: int, context: int, compile: bool) -> int:
    """Slots to allocate. With compile, round up to a power of two (at least 64) so that a whole chat, whose
    prompt grows every turn, needs a handful of compiled graphs rather than one per length (a frozen CPU
    graph takes tens of seconds to compile). The extra slots are masked by causality: a decode step's
    attention over them is a few small products, next to reading every weight once."""
    needed = min(prompt_len + max_new_tokens, context)
    if compile:
        needed = min(max(64, 1 << (needed - 1).bit_length()), context)
    return needed


class DecodeSession:
    """R rows x S slots of KV cache for `model` (a CausalLM), and the (optionally compiled) step functions.

    Use it as a context manager: inside, the model is in eval mode; afterwards its mode and caches are
    what they were. With `compile`, the cache comes from the ones kept for compiled runs (a compiled graph
    is specialised to the cache tensors it was compiled with; lmstack.generate.compiled).

    `lengths` (R,) holds how many tokens each row's cache holds: a row's next token goes to slot
    lengths[r]. `decode` advances the rows marked running; a strategy that wrote tokens it then rejects
    (speculative decoding) sets `lengths` back, and their slots are simply written again later.
    """

    def __init__(self, model: CausalLM, rows: int, cache_len: int, compile: bool = False):
        context = model.config.max_seq_len
        if cache_len > context:
            raise GenerationError(f"a cache of {cache_len} slots exceeds the model's context ({context} tokens)")
        self.model, self.rows, self.cache_len, self.compile = model, rows, cache_len, compile
        self.device = model_device(model)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=self.device)  # (R,) tokens held per row
        self.running = torch.zeros(rows, dtype=torch.long, device=self.device)  # (R,) 1 = decode advances it
        self.caches = take_cache(model, rows, cache_len) if compile else model.make_cache(rows, cache_len)
        self._decode_fn = self._step_fn(decode_step)
        self._score_fn: Callable[..., torch.Tensor] | None = None  # compiled on first use (speculative only)
        self._saved: tuple[bool, list[Any]] | None = None

    def _step_fn(self, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return compiled_for(self.model, fn) if self.compile else fn

    def __enter__(self) -> Self:
        self._saved = (self.model.training, self.model.kv_caches())
        self.model.eval()
        self.model.use_caches(self.caches)
        return self

    def __exit__(self, *exc: object) -> None:
        was_training, previous = self._saved
        self.model.use_caches(previous)
        self.model.train(was_training)
        if self.compile:
            keep_cache(self.model, self.caches)

    def _install(self) -> None:
        """Put this session's caches in the model (another session on the same model may have swapped them)."""
        if self.model.kv_caches()[0] is not self.caches[0]:
            self.model.use_caches(self.caches)

    # ------------------------------------------------------------------------------ model calls
    def prefill(self, prompts: Sequence[Sequence[int]], rows: Sequence[int], start: int = 0) -> torch.Tensor:
        """Write prompt i into row rows[i], slots [0, len); mark those rows running; return the logits of each
        prompt's last token (n, V) fp32. Consecutive rows are prefilled together, right-padded, on a view
        of their cache rows, so the other rows are untouched.

        With `start` > 0 the rows already hold each prompt's first `start` tokens (a cached prefix put there
        by `write_slots`): only slots [start, len) are computed."""
        if len(prompts) != len(rows) or not prompts:
            raise GenerationError(f"prefill takes one row per prompt: got {len(prompts)} prompts, {len(rows)} rows")
        for prompt in prompts:
            if not start < len(prompt) <= self.cache_len:
                raise GenerationError(f"a prompt of {len(prompt)} tokens does not fit a row of {self.cache_len} slots"
                                      + (f" after a cached prefix of {start}" if start else ""))
        self._install()
        pieces, first = [], 0
        for end in range(1, len(rows) + 1):
            if end == len(rows) or rows[end] != rows[end - 1] + 1:
                pieces.append(self._prefill_run(prompts[first:end], rows[first], start))
                first = end
        index = torch.tensor(list(rows), device=self.device)
        self.lengths[index] = torch.tensor([len(p) for p in prompts], device=self.device)
        self.running[index] = 1
        return torch.cat(pieces)

    def _prefill_run(self, prompts: Sequence[Sequence[int]], first_row: int, start: int = 0) -> torch.Tensor:
        ids, lengths = right_pad([p[start:] for p in prompts], self.device)  # (n, P), (n,)
        n, P = ids.shape
        # Only the slots the prompts fill: attention over a long row's empty tail is wasted (a server's rows
        # hold the model's whole context). With compile the prefill is not compiled, so the shape may vary.
        S = _round_slots(start + P, self.cache_len)
        self.model.use_caches([_window(cache, first_row, first_row + n, S) for cache in self.caches])
        try:
            with torch.no_grad(), _autocast(self.device):
                slots = torch.arange(start, start + P, device=self.device)  # (P,): positions follow the slots
                hidden = self.model.hidden_states(ids, cache_slots=slots)  # (n, P, d)
                last = hidden[torch.arange(n, device=self.device), lengths - 1]  # (n, d): each prompt's last token
                return self.model.head(last).float()  # (n, V): the head runs on one position per row only
        finally:
            self.model.use_caches(self.caches)

    def decode(self, tokens: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """tokens (R,), one per row, written at each row's next slot -> logits (R, V) fp32; the running rows
        advance by one. A row that is not running computes too (static shapes) and rewrites its next slot.

        rows: decode only rows [0, rows) -> logits (rows, V), attending over only the slots they hold
        (rounded up to a multiple of 64), on a view of the caches; the rows past it must hold nothing (a
        server's partly empty pool of long rows). Not with compile, whose graph has one shape. The window's
        width reads the lengths on the host: on an accelerator, a wait for the tiny length update only."""
        self._install()
        # Clamped so that a row left at the end of the cache rewrites its last slot instead of indexing past it.
        slots = self.lengths.clamp(max=self.cache_len - 1)[:, None]  # (R, 1)
        if rows is None or self.compile:
            logits = self._decode_fn(self.model, tokens[:, None], slots)
        else:
            slots = slots[:rows]  # (n, 1)
            S = _round_slots(int(slots.max()) + 1, self.cache_len)  # covers every row's next slot
            self.model.use_caches([_window(cache, 0, rows, S) for cache in self.caches])
            try:
                logits = self._decode_fn(self.model, tokens[:rows, None], slots)
            finally:
                self.model.use_caches(self.caches)
        self.lengths += self.running
        return logits

    def score(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (R, T) written at each row's next T slots -> logits (R, T, V) fp32. Lengths stay: the caller
        `advance`s each row by the tokens it keeps."""
        if self._score_fn is None:
            self._score_fn = self._step_fn(score_tokens)
        self._install()
        T = tokens.shape[1]
        slots = (self.lengths[:, None] + torch.arange(T, device=self.device)).clamp(max=self.cache_len - 1)  # (R, T)
        return self._score_fn(self.model, tokens, slots)

    # ------------------------------------------------------------------------------ bookkeeping
    def advance(self, counts: torch.Tensor) -> None:
        """Running rows keep `counts` (R,) more of the tokens last written past their length."""
        self.lengths += counts * self.running

    def set_running(self, rows: Sequence[int], running: bool) -> None:
        """Whether `decode` advances these rows (a finished or paused row does not)."""
        self.running[torch.tensor(list(rows), device=self.device)] = int(running)

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i continues row rows[i] (R,): its cache, length and running flag (beam search)."""
        for cache in self.caches:
            cache.k.copy_(cache.k.index_select(0, rows))
            cache.v.copy_(cache.v.index_select(0, rows))
        self.lengths.copy_(self.lengths.index_select(0, rows))
        self.running.copy_(self.running.index_select(0, rows))

    def read_slots(self, row: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of `row`'s first n slots in every layer, [(k, v) (H_kv, n, D)]: a prefix that a server
        caches and writes into other rows (`write_slots`) instead of computing it again."""
        return [(cache.k[row, :, :n].clone(), cache.v[row, :, :n].clone()) for cache in self.caches]

    def write_slots(self, rows: Sequence[int], kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write a prefix from `read_slots` into slots [0, n) of each of `rows`; `prefill(..., start=n)` goes on."""
        index = torch.tensor(list(rows), device=self.device)
        for cache, (k, v) in zip(self.caches, kv):
            n = k.shape[1]
            cache.k[index, :, :n] = k.to(cache.k.dtype)
            cache.v[index, :, :n] = v.to(cache.v.dtype)

    def release(self, row: int) -> None:
        """Free a row: it holds nothing and stops advancing; the next prefill into it overwrites its slots."""
        self.lengths[row] = 0
        self.running[row] = 0
