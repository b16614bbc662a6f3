"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023), greedy: a small draft model proposes
k tokens one at a time, the target model scores all of them in one forward of k+1 tokens, and the
longest prefix on which the target agrees is kept, plus the target's own next token. Every emitted token
is the target's argmax given the tokens before it, so the output is the target's greedy output (up to
floating-point ties between logits); the draft only changes how many target forwards it costs.

Both models keep static KV caches. Rejected proposals need no rollback: their slots are simply written
again next round, and causality hides slots beyond the current query until then.

A batch accepts, each round, the smallest number of tokens any unfinished row accepted, so all rows stay
in step on the same cache slots (each row's tokens are still its own target argmax).

Shapes: B batch, k draft tokens per round, V vocabulary, S cache slots.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from lmstack.errors import GenerationError
from lmstack.generate.compiled import compiled_for
from lmstack.generate.config import GenerationConfig
from lmstack.generate.generate import (GenerationOutput, GenerationStats, _autocast, build_output, cache_length,
                                       decode_step_fn, kv_cache_session, prefill, prepare, resolve_eos_ids)
from lmstack.generate.prompts import PromptInput, TokenizerLike
from lmstack.generate.stopping import SequenceState
from lmstack.model.transformer import Transformer


def score_tokens(model: Transformer, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                 cache_mask: torch.Tensor) -> torch.Tensor:
    """Several tokens per row through the cache: tokens (B, T) at slots (T,), positions (B, T) -> logits (B, T, V)."""
    with torch.no_grad(), _autocast(tokens.device):
        return model(tokens, attention_mask=cache_mask, position_ids=positions, cache_slots=slots).float()


def _score_fn(model: Transformer, compile: bool) -> Callable[..., torch.Tensor]:
    return compiled_for(model, score_tokens) if compile else score_tokens


def check_draft(target: Transformer, draft: Transformer, config: GenerationConfig) -> None:
    if draft.config.vocab_size != target.config.vocab_size:
        raise GenerationError(f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
                         f"({target.config.vocab_size}); speculative decoding needs the same tokenizer")
    if config.do_sample or config.uses_penalties:
        raise GenerationError("speculative decoding here is greedy: leave temperature at 0 and the penalties off")
    if config.logprobs or config.top_logprobs:
        raise GenerationError("logprobs are not supported with speculative decoding")


def speculative_generate(target: Transformer, draft: Transformer, tokenizer: TokenizerLike | None,
                         prompts: PromptInput, config: GenerationConfig) -> GenerationOutput:
    """Greedy generation of `target`, accelerated by `draft`. stats.acceptance_rate = accepted / proposed."""
    check_draft(target, draft, config)
    batch, max_new = prepare(target, tokenizer, prompts, config)
    B, P = batch.ids.shape
    k, device = config.num_draft_tokens, batch.ids.device
    context = min(target.config.max_seq_len, draft.config.max_seq_len)
    if P >= context:
        raise GenerationError(f"the prompt ({P} tokens) does not fit the draft model's context ({context})")
    max_new = min(max_new, context - P)
    S = cache_length(P, max_new + k + 1, context, config.compile)  # room for the last round's k+1 slots
    eos_ids = resolve_eos_ids(target, tokenizer, config)
    sequences = [SequenceState(tokenizer, p, eos_ids, config.stop, max_new) for p in batch.prompts]
    stats = GenerationStats(prompt_tokens=int(batch.lengths.sum()), batch_size=B)
    cache_mask = torch.ones(B, S, dtype=torch.long, device=device)
    cache_mask[:, :P] = batch.mask
    draft_step = decode_step_fn(draft, config.compile)
    verify = _score_fn(target, config.compile)
    proposed = accepted = 0
    slot = torch.zeros(1, dtype=torch.long, device=device)  # refilled in place: no host-to-device copy
    window = torch.arange(k + 1, device=device)

    with kv_cache_session(target, B, S, config.compile), kv_cache_session(draft, B, S, config.compile):
        start = time.perf_counter()
        last = prefill(target, batch.ids, cache_mask).argmax(-1)  # (B,) the first new token
        prefill(draft, batch.ids, cache_mask)
        _push(sequences, [last.tolist()])
        stats.prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        n = P  # slot of `last`, which neither cache holds yet
        draft_backlog: torch.Tensor | None = None  # (B,) an accepted token the draft cache still lacks
        while not all(s.finished for s in sequences) and n + k < S:
            # 1. the draft proposes k tokens, one forward each
            proposal = []
            token = last
            if draft_backlog is not None:
                draft_step(draft, draft_backlog[:, None], slot.fill_(n - 1),
                           (batch.lengths + (n - 1 - P))[:, None], cache_mask)
            for i in range(k):
                logits = draft_step(draft, token[:, None], slot.fill_(n + i),
                                    (batch.lengths + (n + i - P))[:, None], cache_mask)
                token = logits.argmax(-1)
                proposal.append(token)
            drafted = torch.stack(proposal, dim=1)  # (B, k)
            # 2. the target scores last + the k proposals in one forward
            tokens = torch.cat((last[:, None], drafted), dim=1)  # (B, k+1)
            slots = window + n
            positions = (batch.lengths + (n - P))[:, None] + window  # (B, k+1)
            choice = verify(target, tokens, slots, positions, cache_mask).argmax(-1)  # (B, k+1)
            stats.decode_steps += 1
            # 3. accept the longest agreeing prefix (the smallest over unfinished rows) + the target's next token
            agree = (drafted == choice[:, :k]).long().cumprod(dim=1).sum(dim=1)  # (B,)
            open_rows = torch.tensor([not s.finished for s in sequences], device=device)
            n_accept = int(agree[open_rows].min())  # the stop test's sync
            proposed += k
            accepted += n_accept
            new = choice[:, :n_accept + 1]  # (B, a+1): the target's argmax at each accepted position
            _push(sequences, new.t().tolist())
            last = choice[:, n_accept]
            draft_backlog = drafted[:, k - 1] if n_accept == k else None
            n += n_accept + 1
        for s in sequences:
            s.force_finish("length")
        stats.decode_s = time.perf_counter() - start
    stats.new_tokens = sum(len(s.ids) for s in sequences)
    stats.acceptance_rate = accepted / proposed if proposed else None
    return build_output(sequences, tokenizer, config, stats)


def _push(sequences: list[SequenceState], steps: list[list[int]]) -> None:
    """Append each step's token (one per row) to the rows still running."""
    for step in steps:
        for sequence, token in zip(sequences, step):
            if not sequence.finished:
                sequence.push(token)
