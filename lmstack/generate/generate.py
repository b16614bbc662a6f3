"""Generation with a static KV cache: one prefill, then one decode-step function called once per token.

    prefill:     prompt ids (B, P) -> cache slots [0, P) filled, logits of the last position (B, V)
    decode_step: tokens (B, 1) at slot s -> cache slot s filled, logits (B, V)

Every decode step has the same shapes (the cache is preallocated, the attention mask covers all its
slots), so `torch.compile` compiles `decode_step` once per (batch, cache length) and reuses it. The loop
synchronises with the host once per step: the stop test reads the new ids (B,), which also feeds stop
strings, streaming and the per-sequence bookkeeping.

Shapes: B batch, P padded prompt length, S cache slots, V vocabulary.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lmstack.device import autocast, resolve_precision
from lmstack.errors import GenerationError
from lmstack.generate.compiled import compiled_for, kept_cache
from lmstack.generate.config import GenerationConfig, resolve_config
from lmstack.generate.prompts import PromptBatch, PromptInput, TokenizerLike, encode_prompts, fit_to_context, left_pad
from lmstack.generate.sampling import TokenCounts, next_tokens, token_logprobs
from lmstack.generate.stopping import FinishReason, SequenceState
from lmstack.model.transformer import Transformer

# ------------------------------------------------------------------------------------------- results


@dataclass
class GenerationStats:
    """Where the time went. Prefill ends when the first new token is on the host."""

    prompt_tokens: int = 0  # real (unpadded) prompt tokens over the batch
    new_tokens: int = 0  # generated tokens over the batch (finished rows stop counting)
    decode_steps: int = 0  # decode-step calls (model forwards after the prefill)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    batch_size: int = 1
    acceptance_rate: float | None = None  # speculative decoding: accepted draft tokens / proposed

    @property
    def decode_tokens_per_s(self) -> float:
        """Batch tokens per second of the decode phase (every row of every step counts)."""
        return self.decode_steps * self.batch_size / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class Beam:
    """One of the n-best beam-search hypotheses."""

    token_ids: list[int]
    score: float  # sum of log-probs / generated_length ** length_penalty (transformers' sequences_scores)
    text: str | None = None


@dataclass
class GenerationOutput:
    """What `generate` returns: per prompt, the new token ids (EOS included when it ended the sequence),
    the text (with a tokenizer), why it finished and, on request, log-probabilities."""

    token_ids: list[list[int]]
    texts: list[str] | None
    finish_reasons: list[FinishReason]
    logprobs: list[list[float]] | None = None  # log p(chosen token) under the raw model, per step
    top_logprobs: list[list[dict[int, float]]] | None = None  # the top_logprobs alternatives, per step
    beams: list[list[Beam]] | None = None  # beam search: num_return_sequences best hypotheses per prompt
    stats: GenerationStats = field(default_factory=GenerationStats)


# ------------------------------------------------------------------------------------------- the model calls


def _autocast(device: torch.device) -> Any:
    """The one precision policy (lmstack.device): bf16 autocast on CUDA, plain fp32 on the CPU."""
    return autocast(device, resolve_precision("auto", device))


def prefill(model: Transformer, ids: torch.Tensor, cache_mask: torch.Tensor) -> torch.Tensor:
    """Run the prompt (B, P) through the model, filling cache slots [0, P); return the last logits (B, V) fp32.

    cache_mask (B, S): 1 on the real prompt tokens and on every slot after the prompt, 0 on pads.
    Only the last position goes through the LM head: a (P x V) matmul per row saved.
    """
    P = ids.shape[1]
    slots = torch.arange(P, device=ids.device)
    with torch.no_grad(), _autocast(ids.device):
        hidden = model.hidden_states(ids, attention_mask=cache_mask, cache_slots=slots)  # (B, P, d)
        return model.lm_head(hidden[:, -1]).float()  # (B, V)


def decode_step(model: Transformer, tokens: torch.Tensor, slot: torch.Tensor, positions: torch.Tensor,
                cache_mask: torch.Tensor) -> torch.Tensor:
    """One token per row: tokens (B, 1) written at cache slot `slot` (1,), positions (B, 1) -> logits (B, V) fp32.

    Static shapes and no Python branching on tensor values: this is the function `torch.compile` compiles.
    """
    with torch.no_grad(), _autocast(tokens.device):
        logits = model(tokens, attention_mask=cache_mask, position_ids=positions, cache_slots=slot)  # (B, 1, V)
        return logits[:, -1].float()


def decode_step_fn(model: Transformer, compile: bool) -> Callable[..., torch.Tensor]:
    """The decode step, compiled for `model` when asked (see lmstack.generate.compiled)."""
    return compiled_for(model, decode_step) if compile else decode_step


@contextlib.contextmanager
def kv_cache_session(model: Transformer, batch_size: int, cache_len: int, compile: bool) -> Iterator[None]:
    """Eval mode and a static KV cache of `cache_len` slots for one generation; afterwards the model's
    mode and cache are what they were. Compiled runs take their cache from `kept_cache`: a frozen graph
    is specialised to the cache tensors it was compiled with."""
    was_training, previous = model.training, model.kv_caches()
    model.eval()
    caches = kept_cache(model, batch_size, cache_len) if compile else model.make_cache(batch_size, cache_len)
    model.use_caches(caches)
    try:
        yield
    finally:
        model.use_caches(previous)
        model.train(was_training)


def cache_length(padded_prompt_len: int, max_new_tokens: int, context: int, compile: bool) -> int:
    """Slots to allocate. With compile, round up to a power of two (at least 64) so that a whole chat, whose
    prompt grows every turn, needs a handful of compiled graphs rather than one per length (a frozen CPU
    graph takes 20-40 s to compile). The extra slots are masked by causality: a decode step's attention
    over them is a few small products, next to reading every weight once."""
    needed = min(padded_prompt_len + max_new_tokens, context)
    if compile:
        needed = min(max(64, 1 << (needed - 1).bit_length()), context)
    return needed


# ------------------------------------------------------------------------------------------- setup shared by every strategy


@dataclass
class StreamEvent:
    """One streamed piece: `text` is the newly safe text of row `row` ('' while a character or a possible
    stop string is incomplete); `token_id` is None for the final flush after the sequence finished."""

    row: int
    token_id: int | None
    text: str
    finished: bool


def resolve_eos_ids(model: Transformer, tokenizer: TokenizerLike | None, config: GenerationConfig) -> set[int]:
    """EOS ids: the config's, else the model config's plus the tokenizer's."""
    if config.ignore_eos:
        return set()
    if config.eos_token_ids is not None:
        return set(config.eos_token_ids)
    ids = set(model.config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def prepare(model: Transformer, tokenizer: TokenizerLike | None, prompts: PromptInput,
            config: GenerationConfig) -> tuple[PromptBatch, int]:
    """Encode, check and left-pad the prompts; return the batch and the number of new tokens that fit."""
    if config.stop and tokenizer is None:
        raise GenerationError("stop strings are matched on decoded text: pass a tokenizer (or use eos_token_ids)")
    context = model.config.max_seq_len
    ids = fit_to_context(encode_prompts(prompts, tokenizer), model.config.vocab_size, context,
                         config.max_new_tokens, config.truncate_prompt)
    pad_id = 0
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        pad_id = tokenizer.pad_token_id
    elif model.config.pad_token_id is not None:
        pad_id = model.config.pad_token_id
    device = model.lm_head.weight.device
    batch = left_pad(ids, pad_id, device)
    return batch, min(config.max_new_tokens, context - batch.padded_len)


def make_generator(config: GenerationConfig, device: torch.device) -> torch.Generator | None:
    if not config.do_sample:
        return None
    generator = torch.Generator(device=device)
    if config.seed is not None:
        generator.manual_seed(config.seed)
    else:
        generator.seed()
    return generator


# ------------------------------------------------------------------------------------------- the decode loop


class GenerationRun:
    """One batched generation. Iterate `events()` to stream; `output()` gives the result afterwards."""

    def __init__(self, model: Transformer, tokenizer: TokenizerLike | None, prompts: PromptInput,
                 config: GenerationConfig):
        if config.num_beams > 1:
            raise GenerationError("GenerationRun does greedy/sampled decoding; beam search runs in lmstack.generate.beam")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.batch, self.max_new_tokens = prepare(model, tokenizer, prompts, config)
        eos_ids = resolve_eos_ids(model, tokenizer, config)
        self.sequences = [SequenceState(tokenizer, prompt, eos_ids, config.stop, self.max_new_tokens)
                          for prompt in self.batch.prompts]
        self.stats = GenerationStats(prompt_tokens=int(sum(len(p) for p in self.batch.prompts)),
                                     batch_size=self.batch.batch_size)

    def events(self) -> Iterator[StreamEvent]:
        """Generate, yielding a StreamEvent per row per step until every row has finished."""
        model, config, batch = self.model, self.config, self.batch
        B, P = batch.ids.shape
        device = batch.ids.device
        S = cache_length(P, self.max_new_tokens, model.config.max_seq_len, config.compile)
        with kv_cache_session(model, B, S, config.compile):
            cache_mask = torch.ones(B, S, dtype=torch.long, device=device)
            cache_mask[:, :P] = batch.mask  # pads stay hidden; later slots are guarded by causality
            counts = TokenCounts(batch.ids, batch.mask, model.config.vocab_size) if config.uses_penalties else None
            generator = make_generator(config, device)
            step_fn = decode_step_fn(model, config.compile)
            slot = torch.zeros(1, dtype=torch.long, device=device)  # refilled in place: no host-to-device copy

            start = time.perf_counter()
            logits = prefill(model, batch.ids, cache_mask)  # (B, V)
            for step in range(self.max_new_tokens):
                tokens = next_tokens(logits, config, counts, generator)  # (B,)
                chosen = top_values = top_ids = None
                if config.logprobs or config.top_logprobs:
                    chosen, top_values, top_ids = token_logprobs(logits, tokens, config.top_logprobs)
                host_tokens = tokens.tolist()  # the one sync per step: the stop test needs the ids
                if step == 0:
                    self.stats.prefill_s = time.perf_counter() - start
                    start = time.perf_counter()
                yield from self._record(host_tokens, chosen, top_values, top_ids)
                if all(s.finished for s in self.sequences):
                    break
                if counts is not None:
                    counts.add(tokens)
                positions = (batch.lengths + step)[:, None]  # (B, 1): real tokens before this one
                logits = step_fn(model, tokens[:, None], slot.fill_(P + step), positions, cache_mask)
                self.stats.decode_steps += 1
            for row, sequence in enumerate(self.sequences):  # context full before max_new_tokens
                if not sequence.finished:
                    yield StreamEvent(row, None, sequence.force_finish("length"), True)
            self.stats.decode_s = time.perf_counter() - start

    def _record(self, tokens: list[int], chosen: torch.Tensor | None, top_values: torch.Tensor | None,
                top_ids: torch.Tensor | None) -> Iterator[StreamEvent]:
        """Push one step's tokens into the unfinished sequences."""
        chosen_list = chosen.tolist() if chosen is not None else None
        top_v = top_values.tolist() if top_values is not None else None
        top_i = top_ids.tolist() if top_ids is not None else None
        for row, (sequence, token) in enumerate(zip(self.sequences, tokens)):
            if sequence.finished:
                continue
            top = dict(zip(top_i[row], top_v[row])) if top_i is not None else None
            piece = sequence.push(token, chosen_list[row] if chosen_list is not None else None, top)
            self.stats.new_tokens += 1
            yield StreamEvent(row, token, piece, sequence.finished)

    def output(self) -> GenerationOutput:
        """The result (call after `events()` is exhausted)."""
        return build_output(self.sequences, self.tokenizer, self.config, self.stats)


def build_output(sequences: list[SequenceState], tokenizer: TokenizerLike | None, config: GenerationConfig,
                 stats: GenerationStats) -> GenerationOutput:
    return GenerationOutput(
        token_ids=[s.ids for s in sequences],
        texts=[s.text for s in sequences] if tokenizer is not None else None,
        finish_reasons=[s.finish_reason or "length" for s in sequences],
        logprobs=[s.logprobs for s in sequences] if config.logprobs else None,
        top_logprobs=[s.top_logprobs for s in sequences] if config.top_logprobs else None,
        stats=stats,
    )


# ------------------------------------------------------------------------------------------- public API


def generate(model: Transformer, tokenizer: TokenizerLike | None, prompts: PromptInput, *,
             config: GenerationConfig | None = None, draft_model: Transformer | None = None,
             **options: Any) -> GenerationOutput:
    """Generate continuations of one or more prompts.

    model: an lmstack Transformer. tokenizer: an lmstack Tokenizer, or None to work in token ids.
    prompts: a string, a list of strings, a list of ids, a list of id lists, or an id tensor (T,)/(B, T).
    options: any GenerationConfig field (temperature=0.7, top_p=0.9, num_beams=4, stop=["\\n"], ...),
        applied over `config`. Unknown names and out-of-range values raise ValueError naming the option.
    draft_model: a smaller model with the same vocabulary for speculative decoding (greedy only).

    Returns a GenerationOutput: token_ids (new ids per prompt), texts (with a tokenizer), finish_reasons,
    logprobs / top_logprobs on request, the n-best beams for beam search, and timing stats.
    """
    config = resolve_config(config, options)
    if config.num_beams > 1:
        from lmstack.generate.beam import beam_search

        return beam_search(model, tokenizer, prompts, config)
    if draft_model is not None:
        from lmstack.generate.speculative import speculative_generate

        return speculative_generate(model, draft_model, tokenizer, prompts, config)
    run = GenerationRun(model, tokenizer, prompts, config)
    for _ in run.events():
        pass
    return run.output()


def stream(model: Transformer, tokenizer: TokenizerLike, prompt: str | list[int], *,
           config: GenerationConfig | None = None, **options: Any) -> Iterator[str]:
    """Yield the text of one prompt's continuation piece by piece as tokens arrive.

    A piece never splits a character and never shows part of a stop string. Same options as `generate`.
    """
    if tokenizer is None:
        raise GenerationError("streaming yields text: pass a tokenizer")
    config = resolve_config(config, options)
    if config.num_beams > 1:
        raise GenerationError("beam search cannot stream: the best sequence is known only at the end")
    ids = encode_prompts(prompt, tokenizer)
    if len(ids) != 1:
        raise GenerationError(f"stream takes one prompt, got {len(ids)}; use GenerationRun.events() for a batch")
    run = GenerationRun(model, tokenizer, ids, config)
    for event in run.events():
        if event.text:
            yield event.text
