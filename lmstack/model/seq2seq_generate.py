"""Generation for the encoder-decoder (T5): greedy, sampling (temperature, top-k, top-p, min-p) and beam search.

The encoder runs once per prompt batch (`Seq2Seq.encode_for_decoding` stores every decoder layer's
cross-attention keys and values); the decoder then takes one token per step over a static
self-attention cache, starting from `decoder_start_token_id`. The filters and beam search follow
transformers' definitions (and lmstack.generate's decoder-only implementation of them), so greedy and
beam outputs equal transformers' `generate` on the same weights.

This is T5's own small loop: lmstack.generate's decode session drives decoder-only models, and when it
can bind an encoder pass per prompt this loop can go. Options not supported here (stop strings,
penalties, logprobs, speculative decoding) are refused by name.

Shapes: B prompts, K beams, S encoder tokens, V vocabulary, N max new tokens, C = 2K candidates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from lmstack.errors import GenerationError
from lmstack.model.seq2seq import Seq2Seq

NEG = -1.0e9  # transformers' "impossible" beam score
_UNSUPPORTED = {"stop": [], "logprobs": False, "top_logprobs": 0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                "frequency_penalty": 0.0, "compile": False, "truncate_prompt": False}


@dataclass
class Seq2SeqOptions:
    """The decoding options this loop reads (the same names as lmstack.generate's GenerationConfig)."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    eos_token_ids: list[int] | None = None
    ignore_eos: bool = False
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1


@dataclass
class Hypothesis:
    token_ids: list[int]
    score: float  # sum of log-probs / generated_length ** length_penalty
    text: str | None = None


@dataclass
class Seq2SeqStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    decode_steps: int = 0
    prefill_s: float = 0.0  # the encoder pass and the first decoder step
    decode_s: float = 0.0
    batch_size: int = 1
    acceptance_rate: float | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps * self.batch_size / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class Seq2SeqOutput:
    """Per prompt: the generated ids (eos included when it ended the sequence), text, finish reason, beams."""

    token_ids: list[list[int]]
    texts: list[str] | None
    finish_reasons: list[str]
    beams: list[list[Hypothesis]] | None = None
    logprobs: None = None
    top_logprobs: None = None
    stats: Seq2SeqStats = field(default_factory=Seq2SeqStats)


def _options(config: Any, overrides: dict[str, Any]) -> Seq2SeqOptions:
    """Seq2SeqOptions from a GenerationConfig-like object and keyword overrides; unsupported options refused."""
    values = {name: getattr(config, name) for name in Seq2SeqOptions.__dataclass_fields__ if hasattr(config, name)}
    for name, default in _UNSUPPORTED.items():
        value = overrides.get(name, getattr(config, name, default))
        if value not in (default, None):
            raise GenerationError(f"{name} is not supported for encoder-decoder models yet")
    unknown = set(overrides) - set(Seq2SeqOptions.__dataclass_fields__) - set(_UNSUPPORTED)
    if unknown:
        raise GenerationError(f"unknown generation option {min(unknown)!r}")
    options = Seq2SeqOptions(**{**values, **{k: v for k, v in overrides.items() if k not in _UNSUPPORTED}})
    if options.max_new_tokens < 1 or options.num_beams < 1 or options.temperature < 0:
        raise GenerationError("max_new_tokens and num_beams must be >= 1 and temperature >= 0")
    if not 1 <= options.num_return_sequences <= options.num_beams:
        raise GenerationError(f"num_return_sequences ({options.num_return_sequences}) must be in [1, num_beams]")
    if options.num_beams > 1 and options.temperature > 0:
        raise GenerationError("beam search is deterministic here: set temperature 0 with num_beams > 1")
    return options


def _encode(model: Seq2Seq, tokenizer: Any, prompts: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (a string, strings, ids or id lists) -> right-padded ids (B, S) and mask (B, S)."""
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    rows = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise GenerationError("text prompts need a tokenizer (or pass token ids)")
            p = tokenizer.encode(p, add_special_tokens=True)  # T5's tokenizer appends </s>
        rows.append([int(i) for i in p])
    if not rows or any(not r for r in rows):
        raise GenerationError("every prompt needs at least one token")
    bad = [i for r in rows for i in r if not 0 <= i < model.config.vocab_size]
    if bad:
        raise GenerationError(f"token id {bad[0]} is outside the vocabulary (size {model.config.vocab_size})")
    if max(len(r) for r in rows) > model.config.max_seq_len:
        raise GenerationError(f"a prompt of {max(len(r) for r in rows)} tokens exceeds max_seq_len "
                              f"{model.config.max_seq_len}")
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), model.config.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    device = model.shared.weight.device
    return ids.to(device), mask.to(device)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """transformers' warpers in their order (temperature, top-k, top-p, min-p): (B, V) -> (B, V) with -inf."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[..., -1:], float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


@torch.no_grad()
def generate_seq2seq(model: Seq2Seq, tokenizer: Any, prompts: Any, *, config: Any = None,
                     draft_model: Any = None, **options: Any) -> Seq2SeqOutput:
    """Generate for each prompt: the same calling convention as lmstack.generate (options or a GenerationConfig)."""
    if draft_model is not None:
        raise GenerationError("speculative decoding is not supported for encoder-decoder models")
    opts = _options(config, options)
    ids, mask = _encode(model, tokenizer, prompts)
    eos = set() if opts.ignore_eos else set(opts.eos_token_ids or [model.config.eos_token_id])
    if tokenizer is not None and tokenizer.eos_token_id is not None and not opts.ignore_eos and not opts.eos_token_ids:
        eos.add(tokenizer.eos_token_id)
    was_training = model.training
    model.eval()
    try:
        run = _beam_search if opts.num_beams > 1 else _sample
        out = run(model, ids, mask, opts, sorted(eos))
    finally:
        model.clear_cache()
        model.train(was_training)
    out.stats.prompt_tokens = int(mask.sum())
    if tokenizer is not None:
        out.texts = [tokenizer.decode(t, skip_special_tokens=True) for t in out.token_ids]
        for hypotheses in out.beams or []:
            for h in hypotheses:
                h.text = tokenizer.decode(h.token_ids, skip_special_tokens=True)
    return out


def _step(model: Seq2Seq, tokens: torch.Tensor, t: int) -> torch.Tensor:
    """tokens (R,) at decoder position t -> next-token logits (R, V) fp32."""
    slot = torch.tensor([t], device=tokens.device)
    return model.head(model.decode(tokens[:, None], None, cache_slots=slot)[:, -1]).float()


def _sample(model: Seq2Seq, ids: torch.Tensor, mask: torch.Tensor, opts: Seq2SeqOptions, eos: list[int]
            ) -> Seq2SeqOutput:
    B, device = ids.shape[0], ids.device
    stats = Seq2SeqStats(batch_size=B)
    generator = None
    if opts.temperature > 0:
        generator = torch.Generator(device=device)
        if opts.seed is not None:
            generator.manual_seed(opts.seed)
        else:
            generator.seed()
    start = time.perf_counter()
    model.setup_cache(B, opts.max_new_tokens)
    model.encode_for_decoding(ids, mask)
    tokens = torch.full((B,), model.config.decoder_start_token_id, dtype=torch.long, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    done = [False] * B
    eos_set = set(eos)
    for t in range(opts.max_new_tokens):
        logits = _step(model, tokens, t)
        if opts.temperature > 0:
            filtered = filter_logits(logits, opts.temperature, opts.top_k, opts.top_p, opts.min_p)
            race = torch.empty_like(filtered).exponential_(1.0, generator=generator)  # exponential race = sampling
            tokens = (filtered.softmax(-1) / race).argmax(-1)
        else:
            tokens = logits.argmax(-1)
        host = tokens.tolist()  # the stop test: one sync per step
        if t == 0:
            stats.prefill_s, start = time.perf_counter() - start, time.perf_counter()
        else:
            stats.decode_steps += 1
        for row, token in enumerate(host):
            if done[row]:
                continue
            out[row].append(token)
            if token in eos_set:
                done[row], reasons[row] = True, "eos"
        if all(done):
            break
    stats.decode_s = time.perf_counter() - start
    stats.new_tokens = sum(len(x) for x in out)
    return Seq2SeqOutput(out, None, reasons, stats=stats)


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (B, C, ...) indexed along dim 1 by index (B, K) -> (B, K, ...)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def _beam_search(model: Seq2Seq, ids: torch.Tensor, mask: torch.Tensor, opts: Seq2SeqOptions, eos_ids: list[int]
                 ) -> Seq2SeqOutput:
    """transformers' beam search, step for step (see lmstack.generate.beam for the decoder-only twin)."""
    B, K, N, device = ids.shape[0], opts.num_beams, opts.max_new_tokens, ids.device
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    C = max(2, 1 + len(eos_ids)) * K
    top_k_mask = torch.arange(C, device=device) < K
    row_base = (torch.arange(B, device=device) * K)[:, None]
    stats = Seq2SeqStats(batch_size=B * K)
    start = time.perf_counter()
    model.setup_cache(B * K, N)
    model.encode_for_decoding(ids, mask, repeat=K)
    running = torch.zeros(B, K, N, dtype=torch.long, device=device)
    running_scores = torch.full((B, K), NEG, device=device)
    running_scores[:, 0] = 0.0  # the K beams start identical: only one may expand at first
    finished = torch.zeros(B, K, N, dtype=torch.long, device=device)
    finished_scores = torch.full((B, K), NEG, device=device)
    finished_lengths = torch.zeros(B, K, dtype=torch.long, device=device)
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=device)
    tokens = torch.full((B * K,), model.config.decoder_start_token_id, dtype=torch.long, device=device)
    for t in range(N):
        log_probs = torch.log_softmax(_step(model, tokens, t), dim=-1)
        if t == 0:
            stats.prefill_s, start = time.perf_counter() - start, time.perf_counter()
        else:
            stats.decode_steps += 1
        V = log_probs.shape[-1]
        total = (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        cand_scores, cand_index = torch.topk(total, C, dim=-1)  # (B, C)
        parent, token = cand_index // V, cand_index % V
        cand_seqs = _gather(running, parent).clone()  # (B, C, N)
        cand_seqs[:, :, t] = token
        ends = torch.isin(token, eos) | (t + 1 == N)
        keep = torch.topk(cand_scores + ends.float() * NEG, K, dim=-1).indices  # the best K that go on
        running = _gather(cand_seqs, keep)
        running_scores = _gather(cand_scores + ends.float() * NEG, keep)
        rows = (row_base + _gather(parent, keep)).view(-1)
        just_finished = ends & top_k_mask[None, :]
        offered = cand_scores / ((t + 1) ** opts.length_penalty)
        full = is_finished.all(dim=-1, keepdim=True) & (opts.early_stopping is True)
        offered = offered + full.float() * NEG + (~can_improve).float() * NEG + (~just_finished).float() * NEG
        merged = torch.cat((finished_scores, offered), dim=1)
        best = torch.topk(merged, K, dim=-1).indices
        finished = _gather(torch.cat((finished, cand_seqs), dim=1), best)
        finished_scores = _gather(merged, best)
        finished_lengths = _gather(torch.cat((finished_lengths, torch.full_like(token, t + 1)), dim=1), best)
        is_finished = _gather(torch.cat((is_finished, just_finished), dim=1), best)
        best_length = N if (opts.early_stopping == "never" and opts.length_penalty > 0.0) else t + 1
        best_running = running_scores[:, :1] / (best_length ** opts.length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, NEG)
        can_improve = can_improve & (best_running > worst_finished).any(dim=-1, keepdim=True)
        all_done = is_finished.all() & (opts.early_stopping is True)
        if not bool(can_improve.any() & ~all_done & ~ends.all()):
            break
        model.reorder_cache(rows)
        tokens = running[:, :, t].reshape(B * K)
    stats.decode_s = time.perf_counter() - start
    beams = [[Hypothesis(finished[b, k, :int(finished_lengths[b, k])].tolist(), float(finished_scores[b, k]))
              for k in range(opts.num_return_sequences)] for b in range(B)]
    eos_set = set(eos_ids)
    best_ids = [h[0].token_ids for h in beams]
    stats.new_tokens = sum(len(x) for x in best_ids)
    return Seq2SeqOutput(best_ids, None, ["eos" if x and x[-1] in eos_set else "length" for x in best_ids],
                         beams=beams, stats=stats)


__all__ = ["Seq2SeqOutput", "generate_seq2seq"]
