"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023), greedy: a small draft model proposes
k tokens one at a time, the target model scores all of them in one forward of k+1 tokens, and the
longest prefix on which the target agrees is kept, plus the target's own next token. Every emitted token
is the target's argmax given the tokens before it, so the output is the target's greedy output (up to
floating-point ties between logits); the draft only changes how many target forwards it costs.

Target and draft each have a DecodeSession. Each row accepts its own number of tokens per round (rows
sit at their own cache slots), and rejected proposals need no rollback: the row's length is set back
and their slots are written again next round, hidden by causality until then.

Shapes: B batch, k draft tokens per round, V vocabulary, S cache slots.
"""

from __future__ import annotations

import time

import torch

from lmstack.errors import GenerationError
from lmstack.generate.config import GenerationConfig
from lmstack.generate.prompts import PromptInput, TokenizerLike, prepare_prompts
from lmstack.generate.results import GenerationOutput, GenerationStats, build_output
from lmstack.generate.session import DecodeSession, cache_length
from lmstack.generate.stopping import SequenceState, resolve_eos_ids
from lmstack.model.protocol import CausalLM


def check_draft(target: CausalLM, draft: CausalLM, config: GenerationConfig) -> None:
    if draft.config.vocab_size != target.config.vocab_size:
        raise GenerationError(f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
                              f"({target.config.vocab_size}); speculative decoding needs the same tokenizer")
    if config.do_sample or config.uses_penalties:
        raise GenerationError("speculative decoding here is greedy: leave temperature at 0 and the penalties off")
    if config.logprobs or config.top_logprobs:
        raise GenerationError("logprobs are not supported with speculative decoding")


def speculative_generate(target: CausalLM, draft: CausalLM, tokenizer: TokenizerLike | None,
                         prompts: PromptInput, config: GenerationConfig) -> GenerationOutput:
    """Greedy generation of `target`, accelerated by `draft`. stats.acceptance_rate = accepted / proposed."""
    check_draft(target, draft, config)
    prompts = prepare_prompts(target, tokenizer, prompts, config)
    B, P, k = len(prompts), max(len(p) for p in prompts), config.num_draft_tokens
    context = min(target.config.max_seq_len, draft.config.max_seq_len)
    if P >= context:
        raise GenerationError(f"the prompt ({P} tokens) does not fit the draft model's context ({context})")
    S = cache_length(P, config.max_new_tokens + k + 1, context, config.compile)  # room for a last round's k+1
    eos_ids = resolve_eos_ids(target, tokenizer, config)
    sequences = [SequenceState(tokenizer, p, eos_ids, config.stop, min(config.max_new_tokens, context - len(p)))
                 for p in prompts]
    stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts), batch_size=B)
    proposed = accepted = 0
    held = [len(p) for p in prompts]  # per row, the tokens the target's cache holds (the slot of `last`)

    with DecodeSession(target, B, S, config.compile) as verifier, DecodeSession(draft, B, S, config.compile) as drafter:
        start = time.perf_counter()
        last = verifier.prefill(prompts, range(B)).argmax(-1)  # (B,) the first new token, in neither cache yet
        drafter.prefill(prompts, range(B))
        _push(sequences, range(B), [[t] for t in last.tolist()])
        stats.prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        backlog: torch.Tensor | None = None  # (B,) tokens the draft cache lacks at slot held - 1
        open_rows = list(range(B))
        while True:
            for row in open_rows:
                if not sequences[row].finished and held[row] + k >= S:  # no room for a round's k+1 slots
                    sequences[row].force_finish("length")
            closed = [row for row in open_rows if sequences[row].finished]
            if closed:
                verifier.set_running(closed, False)
                drafter.set_running(closed, False)
                open_rows = [row for row in open_rows if not sequences[row].finished]
            if not open_rows:
                break
            # 1. the draft proposes k tokens, one forward each
            if backlog is not None:
                drafter.decode(backlog)
            proposal, token = [], last
            for _ in range(k):
                token = drafter.decode(token).argmax(-1)  # (B,)
                proposal.append(token)
            drafted = torch.stack(proposal, dim=1)  # (B, k)
            # 2. the target scores last + the k proposals in one forward
            tokens = torch.cat((last[:, None], drafted), dim=1)  # (B, k+1) at each row's slots held .. held+k
            choice = verifier.score(tokens).argmax(-1)  # (B, k+1)
            stats.decode_steps += 1
            # 3. each row keeps its longest agreeing prefix + the target's next token
            agree = (drafted == choice[:, :k]).long().cumprod(dim=1).sum(dim=1)  # (B,)
            host_agree, host_choice = agree.tolist(), choice.tolist()  # the stop test's sync
            _push(sequences, open_rows, [host_choice[row][:host_agree[row] + 1] for row in open_rows])
            proposed += k * len(open_rows)
            accepted += sum(host_agree[row] for row in open_rows)
            for row in open_rows:
                held[row] += host_agree[row] + 1
            verifier.advance(agree + 1)  # the target holds last and the accepted proposals
            last = choice.gather(1, agree[:, None])[:, 0]  # (B,) the target's token after them
            # The draft holds last, d1 .. d(k-1): a row that accepted all k lacks dk, at slot held - 1.
            drafter.lengths.copy_(verifier.lengths)
            backlog = None
            if max(host_agree[row] for row in open_rows) == k:
                # Rewrite slot held - 1 of every row with its token there (for a row that accepted fewer,
                # the same token at the same place: the same keys and values).
                drafter.lengths -= drafter.running
                backlog = tokens.gather(1, agree[:, None])[:, 0]
        stats.decode_s = time.perf_counter() - start
    stats.new_tokens = sum(len(s.ids) for s in sequences)
    stats.acceptance_rate = accepted / proposed if proposed else None
    return build_output(sequences, tokenizer, config, stats)


def _push(sequences: list[SequenceState], rows, tokens: list[list[int]]) -> None:
    """Append each row's new tokens to its sequence, up to where it finishes."""
    for row, new in zip(rows, tokens):
        for token in new:
            if sequences[row].finished:
                break
            sequences[row].push(token)
