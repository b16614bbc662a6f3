"""Beam search over the static KV cache, step for step the algorithm of transformers' `_beam_search`.

Each prompt keeps K = num_beams running hypotheses (rows b*K .. b*K+K-1 of the cache) and a set of K
finished ones. Per step, for every prompt:

1. score every continuation: running score + log p(token), over K x V candidates; keep the best 2K
   (2K so that K survive even if K of them end here);
2. candidates that end (EOS, or the length limit) among the top K are offered to the finished set with
   score = sum log p / generated_length ** length_penalty; the finished set keeps its best K;
3. the best K candidates that did not end become the running beams; the KV cache rows are reordered
   to follow their parents.

Stopping follows transformers exactly: `early_stopping=True` stops a prompt once K hypotheses are
finished; False stops when the best running beam, scored at its current length, cannot beat the
worst finished one; "never" (with length_penalty > 0) assumes the running beam could reach max length.

Shapes: B prompts, K beams, V vocabulary, N max new tokens, C = 2K candidates.
"""

from __future__ import annotations

import time

import torch

from lmstack.errors import GenerationError
from lmstack.generate.config import GenerationConfig
from lmstack.generate.generate import (Beam, GenerationOutput, GenerationStats, cache_length, decode_step_fn,
                                       kv_cache_session, prefill, prepare, resolve_eos_ids)
from lmstack.generate.prompts import PromptInput, TokenizerLike
from lmstack.generate.sampling import TokenCounts, apply_penalties
from lmstack.model.transformer import Transformer

NEG = -1.0e9  # transformers' "impossible" score; kept identical so ties and sums behave the same


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (B, C, ...) indexed along dim 1 by index (B, K) -> (B, K, ...)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def _reorder_cache(model: Transformer, rows: torch.Tensor) -> None:
    """Cache row i takes the keys/values of row rows[i] (B*K,), in every layer."""
    for cache in model.kv_caches():
        cache.k.copy_(cache.k.index_select(0, rows))
        cache.v.copy_(cache.v.index_select(0, rows))


def beam_search(model: Transformer, tokenizer: TokenizerLike | None, prompts: PromptInput,
                config: GenerationConfig) -> GenerationOutput:
    """Beam search for every prompt; `beams` holds the num_return_sequences best per prompt, best first."""
    if config.stop:
        raise GenerationError("stop strings are not supported with beam search; use eos_token_ids")
    if config.logprobs or config.top_logprobs:
        raise GenerationError("logprobs are not supported with beam search; each beam's score is returned instead")
    batch, max_new = prepare(model, tokenizer, prompts, config)
    B, P = batch.ids.shape
    K, device = config.num_beams, batch.ids.device
    eos_ids = sorted(resolve_eos_ids(model, tokenizer, config))
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    C = max(2, 1 + len(eos_ids)) * K  # candidates kept per step, as transformers does
    top_k_mask = torch.arange(C, device=device) < K  # only the best K candidates may finish

    ids = batch.ids.repeat_interleave(K, dim=0)  # (B*K, P)
    prompt_mask = batch.mask.repeat_interleave(K, dim=0)
    lengths = batch.lengths.repeat_interleave(K, dim=0)
    S = cache_length(P, max_new, model.config.max_seq_len, config.compile)
    cache_mask = torch.ones(B * K, S, dtype=torch.long, device=device)
    cache_mask[:, :P] = prompt_mask
    counts = TokenCounts(ids, prompt_mask, model.config.vocab_size) if config.uses_penalties else None
    step_fn = decode_step_fn(model, config.compile)
    slot = torch.zeros(1, dtype=torch.long, device=device)  # refilled in place: no host-to-device copy
    row_base = (torch.arange(B, device=device) * K)[:, None]  # (B, 1): first cache row of each prompt

    running = torch.zeros(B, K, max_new, dtype=torch.long, device=device)
    running_scores = torch.full((B, K), NEG, device=device)
    running_scores[:, 0] = 0.0  # all K beams start identical: only one may expand at first
    finished = torch.zeros(B, K, max_new, dtype=torch.long, device=device)
    finished_scores = torch.full((B, K), NEG, device=device)
    finished_lengths = torch.zeros(B, K, dtype=torch.long, device=device)
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=device)
    stats = GenerationStats(prompt_tokens=int(batch.lengths.sum()), batch_size=B * K)

    with kv_cache_session(model, B * K, S, config.compile):
        start = time.perf_counter()
        logits = prefill(model, ids, cache_mask)  # (B*K, V)
        stats.prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for t in range(max_new):
            log_probs = torch.log_softmax(logits, dim=-1)
            if counts is not None:  # transformers applies its processors to the log-probs
                log_probs = apply_penalties(log_probs, counts, config)
            V = log_probs.shape[-1]
            total = (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
            cand_scores, cand_index = torch.topk(total, C, dim=-1)  # (B, C)
            parent, token = cand_index // V, cand_index % V
            cand_seqs = _gather(running, parent).clone()  # (B, C, N)
            cand_seqs[:, :, t] = token
            ends = torch.isin(token, eos) | (t + 1 == max_new)  # (B, C)

            # 3. the next running beams: the best K candidates that did not end
            keep = torch.topk(cand_scores + ends.float() * NEG, K, dim=-1).indices  # (B, K)
            running = _gather(cand_seqs, keep)
            running_scores = _gather(cand_scores + ends.float() * NEG, keep)
            rows = (row_base + _gather(parent, keep)).view(-1)  # (B*K,) cache row each new beam continues

            # 2. offer the candidates that ended to the finished set
            just_finished = ends & top_k_mask[None, :]
            offered = cand_scores / ((t + 1) ** config.length_penalty)
            full = is_finished.all(dim=-1, keepdim=True) & (config.early_stopping is True)
            offered = offered + full.float() * NEG + (~can_improve).float() * NEG + (~just_finished).float() * NEG
            merged_scores = torch.cat((finished_scores, offered), dim=1)  # (B, K + C)
            best = torch.topk(merged_scores, K, dim=-1).indices
            finished = _gather(torch.cat((finished, cand_seqs), dim=1), best)
            finished_scores = _gather(merged_scores, best)
            finished_lengths = _gather(torch.cat((finished_lengths, torch.full_like(token, t + 1)), dim=1), best)
            is_finished = _gather(torch.cat((is_finished, just_finished), dim=1), best)

            # can a running beam still beat the worst finished one? (transformers' heuristic)
            if config.early_stopping == "never" and config.length_penalty > 0.0:
                best_length = max_new
            else:
                best_length = t + 1
            best_running = running_scores[:, :1] / (best_length ** config.length_penalty)
            worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, NEG)
            can_improve = can_improve & (best_running > worst_finished).any(dim=-1, keepdim=True)
            all_done = is_finished.all() & (config.early_stopping is True)
            if not bool(can_improve.any() & ~all_done & ~ends.all()):  # the stop test: one sync
                break

            next_tokens = running[:, :, t].reshape(B * K)
            _reorder_cache(model, rows)
            if counts is not None:
                counts.reorder(rows)
                counts.add(next_tokens)
            positions = (lengths + t)[:, None]
            logits = step_fn(model, next_tokens[:, None], slot.fill_(P + t), positions, cache_mask)
            stats.decode_steps += 1
        stats.decode_s = time.perf_counter() - start

    beams: list[list[Beam]] = []
    for b in range(B):
        hypotheses = []
        for k in range(config.num_return_sequences):
            seq = finished[b, k, :int(finished_lengths[b, k])].tolist()
            text = tokenizer.decode(seq, skip_special_tokens=True) if tokenizer is not None else None
            hypotheses.append(Beam(seq, float(finished_scores[b, k]), text))
        beams.append(hypotheses)
    stats.new_tokens = sum(len(h[0].token_ids) for h in beams)
    eos_set = set(eos_ids)
    return GenerationOutput(
        token_ids=[h[0].token_ids for h in beams],
        texts=[h[0].text or "" for h in beams] if tokenizer is not None else None,
        finish_reasons=["eos" if h[0].token_ids and h[0].token_ids[-1] in eos_set else "length" for h in beams],
        beams=beams, stats=stats)
