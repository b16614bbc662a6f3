"""Log-likelihood scoring: the one place evaluation runs the model forward.

An item is a context and one or more continuations (a question and its answer choices, a text window).
For each continuation the scorer returns log p(continuation | context), summed over its tokens, and
whether every continuation token is the model's argmax (lm-evaluation-harness's `is_greedy`).

Multiple continuations share their context, which runs once per item, as a tree:

    row    context c1..cP | choice 1 minus its last token | choice 2 minus its last token | ...
    mask   the context causal; each choice sees the context and itself (causally), never another choice
    pos    0..P-1         | P, P+1, ...                   | P, P+1, ...                   (from the context's end)

so one forward scores every choice (the context's last position predicts every first token). Several items
share a row when they fit (each attends only to itself, positions restarting): a forward of B rows is as long
as its longest item and short items fill the rest of the rows instead of padding (`pack_rows`). An item whose
tree would overrun the model's context falls back to two stages:

    stage 1  contexts, left-padded (B, P) -> KV cache slots [0, P); the last position's log-probs (B, V)
             score every choice's first token
    stage 2  each choice minus its last token, right-padded (R, C-1), R = all choices of the B items,
             at slots [P, P+C-1) over a copy of its item's context cache -> log-probs of tokens 2..n

A single continuation (rolling perplexity windows) takes one plain forward of (context + continuation)[:-1]
instead. Either way the head runs only on the positions that score a token (once per position), in chunks,
so (B, T, V) logits never exist. Padding is masked and positions count real tokens only, so an item scores
the same alone as in any batch (up to float rounding: batch sizes 1, 4 and 16 agree to ~1e-6, a test).

Results come back in the input order.
Shapes: B items, R rows, T row length, P context slots, C continuation tokens, d width, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmstack.device import autocast, resolve_precision
from lmstack.errors import DataError
from lmstack.model.protocol import CausalLM, model_device

_HEAD_CHUNK_ELEMENTS = 2**22  # logits per head chunk (16 MiB in fp32)


@dataclass
class Item:
    """A context (at least one token: a BOS / prefix token when the text is empty) and its continuations."""

    context: list[int]
    continuations: list[list[int]]


@dataclass
class Score:
    """One continuation's result."""

    logprob: float  # sum over its tokens of log p(token | everything before it)
    greedy: bool  # every token is the argmax of its distribution
    tokens: int  # tokens scored


@dataclass
class ScoreStats:
    items: int = 0
    forwards: int = 0  # model calls
    tokens_run: int = 0  # positions the model processed (padding included)
    truncated: int = 0  # items whose context was cut from the left to fit the model's context


class Scorer:
    """Batched, shared-context log-likelihood scoring for a CausalLM.

    batch_size: rows per forward, an item each (several when short items share a tree row).
    max_length: the longest window the model may see (default: its max_seq_len less any virtual tokens of a
    prompt / prefix adapter). A context that does not
    fit beside its longest continuation keeps its last tokens (counted in `stats.truncated`), or raises
    DataError with `strict`.
    """

    def __init__(self, model: CausalLM, batch_size: int = 8, max_length: int | None = None, strict: bool = False):
        self.model = model
        self.batch_size = max(1, int(batch_size))
        # virtual tokens of a prompt / prefix adapter (kv_prefix) take the first positions of every window
        prefix = getattr(model, "kv_prefix", None)
        virtual = prefix.num_virtual_tokens if prefix is not None else 0
        self.max_length = int(max_length or model.config.max_seq_len - virtual)
        self.strict = strict
        self.device = model_device(model)
        self.precision = resolve_precision("auto", self.device)
        self.stats = ScoreStats()

    # ------------------------------------------------------------------ public
    def score(self, items: Sequence[Item], progress: Callable[[int], None] | None = None) -> list[list[Score]]:
        """Per item, per continuation: its Score. `progress(n)` is called after each forward with its item count."""
        items = [self._fit(i, item) for i, item in enumerate(items)]
        tree, single, shared = [], [], []
        for i, item in enumerate(items):
            if len(item.continuations) == 1:
                single.append(i)
            elif _tree_length(item) <= self.max_length:
                tree.append(i)
            else:  # its tree row would overrun the model's context: context cache + choices instead
                shared.append(i)
        single.sort(key=lambda i: -len(items[i].context) - _longest(items[i]))  # longest first: less padding
        shared.sort(key=lambda i: (-len(items[i].context), -_longest(items[i])))
        results: list[list[Score]] = [[] for _ in items]

        def run(score: Callable, batch: list[int], inputs: list) -> None:
            with torch.no_grad(), autocast(self.device, self.precision):
                for i, item_scores in zip(batch, score(inputs)):
                    results[i] = item_scores
            self.stats.items += len(batch)
            if progress is not None:
                progress(len(batch))

        for rows in pack_rows(tree, [_tree_length(items[i]) for i in tree], self.batch_size):
            run(self._score_tree, [i for row in rows for i in row], [[items[i] for i in row] for row in rows])
        for score, indices in ((self._score_single, single), (self._score_shared, shared)):
            for at in range(0, len(indices), self.batch_size):
                batch = indices[at:at + self.batch_size]
                run(score, batch, [items[i] for i in batch])
        return results

    # ------------------------------------------------------------------ checks
    def _fit(self, index: int, item: Item) -> Item:
        if not item.context:
            raise DataError(f"item {index}: empty context; start it with a BOS / prefix token")
        if not item.continuations or any(not c for c in item.continuations):
            raise DataError(f"item {index}: every continuation needs at least one token")
        vocab = self.model.config.vocab_size
        for ids in [item.context, *item.continuations]:
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise DataError(f"item {index}: token id {bad} is outside the model's vocabulary ({vocab})")
        longest = _longest(item)
        if longest > self.max_length:
            raise DataError(f"item {index}: a continuation of {longest} tokens does not fit the model's context "
                            f"of {self.max_length} tokens")
        room = self.max_length + 1 - longest  # the last continuation token is never an input
        if len(item.context) > room:
            if self.strict:
                raise DataError(f"item {index}: context of {len(item.context)} tokens + continuation of {longest} "
                                f"exceed the model's context ({self.max_length}); without --strict the context "
                                "keeps its last tokens")
            self.stats.truncated += 1
            return Item(item.context[-room:], item.continuations)
        return item

    # ------------------------------------------------------------------ one continuation: one plain forward
    def _score_single(self, items: list[Item]) -> list[list[Score]]:
        """(context + continuation)[:-1], right-padded (B, T); the last len(continuation) positions score it."""
        inputs = [(item.context + item.continuations[0])[:-1] for item in items]
        T = max(len(x) for x in inputs)
        ids = torch.zeros(len(items), T, dtype=torch.long)
        mask = torch.zeros(len(items), T, dtype=torch.long)
        rows, cols, targets = [], [], []
        for b, (x, item) in enumerate(zip(inputs, items)):
            ids[b, :len(x)] = torch.tensor(x)
            mask[b, :len(x)] = 1
            n = len(item.continuations[0])
            rows += [b] * n
            cols += range(len(x) - n, len(x))
            targets += item.continuations[0]
        ids, mask = ids.to(self.device), mask.to(self.device)
        # Right padding: real tokens never attend to the pads after them, so a full row needs no mask
        # (SDPA's causal fast path); a padded row's mask keeps the positions counted from real tokens.
        hidden = self.model.hidden_states(ids, attention_mask=None if bool(mask.all()) else mask)  # (B, T, d)
        self._count(ids.numel())
        logprob, greedy = self._token_scores(hidden[rows, cols], targets)  # (N,) each
        scores, at = [], 0
        for item in items:
            n = len(item.continuations[0])
            scores.append([Score(float(logprob[at:at + n].sum()), bool(greedy[at:at + n].all()), n)])
            at += n
        return scores

    # ------------------------------------------------------------------ several continuations: tree rows
    def _score_tree(self, rows: list[list[Item]]) -> list[list[Score]]:
        """Items as trees packed in rows: each item's context, then every continuation minus its last token,
        each attending to its own context and to itself only, its positions continuing from the context's end.
        One forward of (rows, T) scores every choice of every item; scores come back item by item, row order."""
        ids, positions, owner, branch = [], [], [], []  # per row; owner: the item's place in its row
        sources, targets, choice_of = [], [], []  # per scored token: the position (flat row-major) predicting it
        T = max(sum(_tree_length(item) for item in row) for row in rows)
        choices = 0
        for r, row in enumerate(rows):
            row_ids, row_pos, row_owner, row_branch = [], [], [], []
            for o, item in enumerate(row):
                P, start = len(item.context), len(row_ids)
                row_ids += item.context
                row_pos += range(P)
                row_owner += [o] * P
                row_branch += [0] * P
                last = r * T + start + P - 1  # the context's last position predicts every first token
                sources += [last] * len(item.continuations)
                targets += [c[0] for c in item.continuations]
                choice_of += range(choices, choices + len(item.continuations))
                for j, cont in enumerate(item.continuations):
                    n = len(cont) - 1
                    sources += range(r * T + len(row_ids), r * T + len(row_ids) + n)
                    targets += cont[1:]
                    choice_of += [choices + j] * n
                    row_ids += cont[:-1]
                    row_pos += range(P, P + n)
                    row_owner += [o] * n
                    row_branch += [j + 1] * n
                choices += len(item.continuations)
            pad = T - len(row_ids)
            ids.append(row_ids + [0] * pad)
            positions.append(row_pos + [0] * pad)
            owner.append(row_owner + [-1] * pad)
            branch.append(row_branch + [0] * pad)
        ids, positions, owner, branch = (torch.tensor(x) for x in (ids, positions, owner, branch))  # (R, T) each
        # (R, T, T), query by key: the same item, the key in the context or the query's own branch, and not after
        # the query (within one item's context and branch, position order is index order: a lower triangle)
        mask = (owner[:, :, None] == owner[:, None, :]) & (owner[:, None, :] >= 0)
        mask &= (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
        mask &= torch.ones(T, T, dtype=torch.bool).tril()
        window = self.model.config.sliding_window
        if window is not None:
            mask &= (positions[:, :, None] - positions[:, None, :]) < window  # query position - key position
        mask |= torch.eye(T, dtype=torch.bool)  # a padding query sees itself (no all-masked row, no NaN)
        device = self.device
        hidden = self.model.hidden_states(ids.to(device), attention_mask=mask[:, None].to(device),
                                          position_ids=positions.to(device))  # (R, T, d)
        self._count(ids.numel())

        # the head once per predicting position (a context's last one serves all its choices' first tokens)
        sources = torch.tensor(sources)
        unique, source_row = torch.unique_consecutive(sources, return_inverse=True)
        logprob, greedy = self._token_scores(hidden.flatten(0, 1)[unique.to(device)], targets,
                                             source_row.to(device))  # (N,) each
        choice_of = torch.tensor(choice_of, device=device)
        total = torch.zeros(choices, dtype=torch.float64, device=device).index_add_(0, choice_of, logprob.double())
        misses = torch.zeros(choices, device=device).index_add_(0, choice_of, (~greedy).float())
        total, misses = total.tolist(), misses.tolist()
        scores, at = [], 0
        for row in rows:
            for item in row:
                scores.append([Score(total[at + j], misses[at + j] == 0, len(c))
                               for j, c in enumerate(item.continuations)])
                at += len(item.continuations)
        return scores

    # ------------------------------------------------------------------ several continuations: shared context
    def _score_shared(self, items: list[Item]) -> list[list[Score]]:
        B, device = len(items), self.device
        P = max(len(item.context) for item in items)
        C = max(_longest(item) for item in items)
        S = P + C - 1
        if S > self.max_length and B > 1:  # one item's long context beside another's long choice: split
            return self._score_shared(items[:B // 2]) + self._score_shared(items[B // 2:])
        item_of_row = [b for b, item in enumerate(items) for _ in item.continuations]
        conts = [c for item in items for c in item.continuations]
        R = len(conts)

        # stage 1: contexts, left-padded, into a B-row cache of P slots
        ctx_ids = torch.zeros(B, P, dtype=torch.long)
        ctx_mask = torch.ones(B, P, dtype=torch.long)
        for b, item in enumerate(items):
            ctx_ids[b, P - len(item.context):] = torch.tensor(item.context)
            ctx_mask[b, :P - len(item.context)] = 0
        ctx_ids, ctx_mask = ctx_ids.to(device), ctx_mask.to(device)
        previous = self.model.kv_caches()
        try:
            context_cache = self.model.make_cache(B, P)
            self.model.use_caches(context_cache)
            hidden = self.model.hidden_states(ctx_ids, attention_mask=ctx_mask,
                                              cache_slots=torch.arange(P, device=device))  # (B, P, d)
            self._count(ctx_ids.numel())
            first_targets = [c[0] for c in conts]
            first_lp, first_greedy = self._token_scores(hidden[item_of_row, -1], first_targets)  # (R,)

            # stage 2: every continuation but its last token, over copies of its item's context cache. Rows
            # run longest first in groups of similar length, so padding stays small when choices differ.
            rest_lp = torch.zeros(R, device=device)
            rest_misses = torch.zeros(R, device=device)  # continuation tokens that are not the argmax
            longer = sorted((r for r in range(R) if len(conts[r]) > 1), key=lambda r: -len(conts[r]))
            group = max(4, self.batch_size)
            for start in range(0, len(longer), group):
                rows = longer[start:start + group]
                lp, misses = self._score_rest(context_cache, ctx_mask, [item_of_row[r] for r in rows],
                                              [conts[r] for r in rows])
                index = torch.tensor(rows, device=device)
                rest_lp.index_copy_(0, index, lp)
                rest_misses.index_copy_(0, index, misses)
        finally:
            self.model.use_caches(previous)

        total = (first_lp + rest_lp).tolist()
        greedy = (first_greedy & (rest_misses == 0)).tolist()
        scores, r = [], 0
        for item in items:
            scores.append([Score(total[r + j], greedy[r + j], len(c)) for j, c in enumerate(item.continuations)])
            r += len(item.continuations)
        return scores

    def _score_rest(self, context_cache: list, ctx_mask: torch.Tensor, items: list[int],
                    conts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens 2..n of N continuations (N,) whose contexts sit in rows `items` of `context_cache` (P slots):
        (summed log-probs (N,), count of non-argmax tokens (N,))."""
        device, P = self.device, ctx_mask.shape[1]
        N, T = len(conts), max(len(c) for c in conts) - 1
        rows = torch.tensor(items, device=device)
        cache = self.model.make_cache(N, P + T)
        for src, dst in zip(context_cache, cache):
            dst.k[:, :, :P].copy_(src.k.index_select(0, rows))
            dst.v[:, :, :P].copy_(src.v.index_select(0, rows))
        self.model.use_caches(cache)
        mask = torch.ones(N, P + T, dtype=torch.long, device=device)  # after the context: causality guards
        mask[:, :P] = ctx_mask.index_select(0, rows)
        ids = torch.zeros(N, T, dtype=torch.long)
        r_idx, c_idx, targets = [], [], []
        for r, cont in enumerate(conts):
            ids[r, :len(cont) - 1] = torch.tensor(cont[:-1])
            r_idx += [r] * (len(cont) - 1)
            c_idx += range(len(cont) - 1)
            targets += cont[1:]
        hidden = self.model.hidden_states(ids.to(device), attention_mask=mask,
                                          cache_slots=torch.arange(P, P + T, device=device))  # (N, T, d)
        self._count(ids.numel())
        lp, greedy = self._token_scores(hidden[r_idx, c_idx], targets)  # (tokens,)
        owner = torch.tensor(r_idx, device=device)
        total = torch.zeros(N, device=device).index_add_(0, owner, lp)
        misses = torch.zeros(N, device=device).index_add_(0, owner, (~greedy).float())
        return total, misses

    # ------------------------------------------------------------------ the head, only where a token is scored
    def _token_scores(self, hidden: torch.Tensor, targets: list[int],
                      source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (M, d) and N target ids, target i predicted by hidden row source[i] (default: row i; sorted)
        -> (log p(target) (N,) fp32, target is the argmax (N,) bool)."""
        target = torch.tensor(targets, dtype=torch.long, device=hidden.device)
        if source is None:
            source = torch.arange(len(targets), device=hidden.device)
        chunk = max(1, _HEAD_CHUNK_ELEMENTS // self.model.config.vocab_size)
        starts = torch.arange(0, hidden.shape[0] + chunk, chunk, device=hidden.device)
        bounds = torch.searchsorted(source, starts).tolist()  # targets [bounds[k], bounds[k+1]) read chunk k
        logprobs, greedy = [], []
        for k, start in enumerate(range(0, hidden.shape[0], chunk)):
            logits = self.model.head(hidden[start:start + chunk]).float()  # (n, V)
            lo, hi = bounds[k], bounds[k + 1]
            row, t = source[lo:hi] - start, target[lo:hi]
            logprobs.append(logits.log_softmax(-1)[row, t])
            greedy.append(logits.max(-1).indices[row] == t)  # the first maximum, as argmax (slower on the CPU)
        return torch.cat(logprobs), torch.cat(greedy)

    def _count(self, positions: int) -> None:
        self.stats.forwards += 1
        self.stats.tokens_run += positions


def _longest(item: Item) -> int:
    return max(len(c) for c in item.continuations)


def pack_rows(indices: list[int], lengths: list[int], rows_per_forward: int) -> list[list[list[int]]]:
    """Forwards of at most `rows_per_forward` rows, each row a list of items (their `indices`) whose `lengths`
    add up to at most the forward's longest item. Longest first; a row starts with the longest item left and
    is filled with the shortest ones that fit, so short items share rows instead of padding them."""
    order = sorted(range(len(indices)), key=lambda k: -lengths[k])
    forwards, first, last = [], 0, len(order) - 1
    while first <= last:
        capacity, rows = lengths[order[first]], []
        while first <= last and len(rows) < rows_per_forward:
            row, room = [indices[order[first]]], capacity - lengths[order[first]]
            first += 1
            while first <= last and lengths[order[last]] <= room:
                row.append(indices[order[last]])
                room -= lengths[order[last]]
                last -= 1
            rows.append(row)
        forwards.append(rows)
    return forwards


def _tree_length(item: Item) -> int:
    """Positions an item's tree row takes: the context and every continuation minus its last token."""
    return len(item.context) + sum(len(c) - 1 for c in item.continuations)


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[Item]:
    """lm-evaluation-harness's rolling loglikelihood windows (get_rolling_token_windows with context_len=1,
    then make_disjoint_window): every token is predicted exactly once; the first window is conditioned on
    `prefix_token` (BOS, or EOS when there is none), each later one on the token before it, and the last
    window is filled up to `max_length` with the tokens before it as context."""
    if not tokens:
        return []
    windows = []
    first = min(max_length, len(tokens))
    windows.append(Item([prefix_token], [tokens[:first]]))
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_length)
        end = predicted + n
        window = tokens[max(end - max_length - 1, 0):end - 1]  # (max_length,) inputs
        context = window[:len(window) - (n - 1)]
        windows.append(Item(context, [tokens[end - n:end]]))
        predicted = end
    return windows


def strided_windows(tokens: list[int], prefix_token: int, max_length: int, stride: int) -> list[Item]:
    """Sliding windows of `max_length` inputs advancing by `stride` tokens; each scores only the tokens no
    earlier window scored, with the rest of its window as context (the 'strided' perplexity of the
    transformers guide). The first window is conditioned on `prefix_token`. stride == max_length is the
    plain non-overlapping case."""
    if not 1 <= stride <= max_length:
        raise DataError(f"stride must be between 1 and the context length ({max_length}), got {stride}")
    sequence = [prefix_token] + tokens  # sequence[i + 1] is tokens[i]; sequence[0] only conditions
    windows, scored = [], 0  # tokens[:scored] are done
    for end in range(min(max_length, len(tokens)), len(tokens) + stride, stride):
        end = min(end, len(tokens))
        if end <= scored:
            break
        begin = max(end - max_length, 0)  # inputs are sequence[begin:end]; targets tokens[begin:end]
        context = sequence[begin:scored + 1]
        windows.append(Item(context, [tokens[scored:end]]))
        scored = end
    return windows


__all__ = ["Item", "Score", "ScoreStats", "Scorer", "rolling_windows", "strided_windows"]
