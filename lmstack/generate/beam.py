"""Beam search over a DecodeSession, step for step the algorithm of transformers' `_beam_search`.

Each prompt keeps K = num_beams running hypotheses (rows b*K .. b*K+K-1 of the session) and a set of K
finished ones. Per step, for every prompt:

1. score every continuation: running score + log p(token), over K x V candidates; keep the best C
   (C >= 2K so that K survive even if some of them end here);
2. candidates that end (EOS, a stop string in their text, or the length limit) among the top K are
   offered to the finished set with score = sum log p / generated_length ** length_penalty; the
   finished set keeps its best K;
3. the best K candidates that did not end become the running beams; the session's rows are reordered
   to follow their parents.

Stopping follows transformers exactly: `early_stopping=True` stops a prompt once K hypotheses are
finished; False stops when the best running beam, scored at its current length, cannot beat the
worst finished one; "never" (with length_penalty > 0) assumes the running beam could reach max length.
A stop string ends a candidate as EOS does (as transformers' StopStringCriteria does in its beam
search); its text is cut before the stop string, as with the other strategies.

Log-probabilities are those of the raw model (before penalties), carried along each hypothesis like its
tokens, so each returned beam has the logprobs of its own tokens.

Shapes: B prompts, K beams, V vocabulary, N max new tokens, C candidates kept per step, n top_logprobs.
"""

from __future__ import annotations

import time

import torch

from lmstack.generate.config import GenerationConfig
from lmstack.generate.prompts import PromptInput, TokenizerLike, prepare_prompts
from lmstack.generate.results import Beam, GenerationOutput, GenerationStats
from lmstack.generate.sampling import TokenCounts, apply_penalties
from lmstack.generate.session import DecodeSession, cache_length
from lmstack.generate.stopping import FinishReason, resolve_eos_ids
from lmstack.model.protocol import CausalLM, model_device

NEG = -1.0e9  # transformers' "impossible" score; kept identical so ties and sums behave the same
REASONS: tuple[FinishReason, ...] = ("length", "eos", "stop")  # the codes kept in `reason` tensors


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (B, C, ...) indexed along dim 1 by index (B, K) -> (B, K, ...)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


class _Hypotheses:
    """K hypotheses per prompt: tokens (B, K, N), and per token its raw log-prob (B, K, N) and top-n
    alternatives (B, K, N, n) when asked. Candidates, running and finished beams all have this form."""

    def __init__(self, tokens: torch.Tensor, logprobs: torch.Tensor | None, top_values: torch.Tensor | None,
                 top_ids: torch.Tensor | None):
        self.tokens, self.logprobs, self.top_values, self.top_ids = tokens, logprobs, top_values, top_ids

    @classmethod
    def empty(cls, B: int, K: int, N: int, logprobs: bool, top_n: int, device: torch.device) -> _Hypotheses:
        def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(zeros(B, K, N, dtype=torch.long), zeros(B, K, N) if logprobs else None,
                   zeros(B, K, N, top_n) if top_n else None, zeros(B, K, N, top_n, dtype=torch.long) if top_n else None)

    def fields(self) -> tuple[torch.Tensor | None, ...]:
        return self.tokens, self.logprobs, self.top_values, self.top_ids

    def gather(self, index: torch.Tensor) -> _Hypotheses:
        """Hypotheses index (B, K) of these (B, C, ...), as copies."""
        return _Hypotheses(*(None if t is None else _gather(t, index) for t in self.fields()))

    def cat(self, other: _Hypotheses) -> _Hypotheses:
        """These and `other` side by side: (B, C1 + C2, ...)."""
        return _Hypotheses(*(None if a is None else torch.cat((a, b), dim=1)
                             for a, b in zip(self.fields(), other.fields())))


def beam_search(model: CausalLM, tokenizer: TokenizerLike | None, prompts: PromptInput,
                config: GenerationConfig) -> GenerationOutput:
    """Beam search for every prompt; `beams` holds the num_return_sequences best per prompt, best first."""
    prompts = prepare_prompts(model, tokenizer, prompts, config)
    B, K, P = len(prompts), config.num_beams, max(len(p) for p in prompts)
    device = model_device(model)
    context = model.config.max_seq_len
    max_new = min(config.max_new_tokens, context - P)  # every beam of every prompt steps together
    eos_ids = sorted(resolve_eos_ids(model, tokenizer, config))
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    C = max(2, 1 + len(eos_ids)) * K  # candidates kept per step, as transformers does
    top_k_mask = torch.arange(C, device=device) < K  # only the best K candidates may finish
    top_n = config.top_logprobs
    want_logprobs = config.logprobs or top_n > 0

    repeated = [p for p in prompts for _ in range(K)]  # row b*K + k: beam k of prompt b
    counts = TokenCounts.from_prompts(repeated, model.config.vocab_size, device) if config.uses_penalties else None
    row_base = (torch.arange(B, device=device) * K)[:, None]  # (B, 1): first row of each prompt

    running = _Hypotheses.empty(B, K, max_new, want_logprobs, top_n, device)
    running_scores = torch.full((B, K), NEG, device=device)
    running_scores[:, 0] = 0.0  # all K beams start identical: only one may expand at first
    finished = _Hypotheses.empty(B, K, max_new, want_logprobs, top_n, device)
    finished_scores = torch.full((B, K), NEG, device=device)
    finished_lengths = torch.zeros(B, K, dtype=torch.long, device=device)
    finished_reasons = torch.zeros(B, K, dtype=torch.long, device=device)  # index into REASONS
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=device)
    stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts), batch_size=B * K)

    S = cache_length(P, max_new, context, config.compile)
    with DecodeSession(model, B * K, S, config.compile) as session:
        start = time.perf_counter()
        logits = session.prefill(repeated, range(B * K))  # (B*K, V)
        stats.prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for t in range(max_new):
            raw = torch.log_softmax(logits, dim=-1)  # (B*K, V) the model's own log-probs
            # transformers applies its processors to the log-probs
            log_probs = apply_penalties(raw, counts, config) if counts is not None else raw
            V = log_probs.shape[-1]
            total = (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
            cand_scores, cand_index = torch.topk(total, C, dim=-1)  # (B, C)
            parent, token = cand_index // V, cand_index % V
            candidates = running.gather(parent)  # (B, C, N, ...): take_along_dim copies
            candidates.tokens[:, :, t] = token
            if want_logprobs:
                candidates.logprobs[:, :, t] = torch.take_along_dim(raw.view(B, K * V), cand_index, dim=1)
            if top_n:
                top_values, top_ids = torch.topk(raw, top_n, dim=-1)  # (B*K, n)
                candidates.top_values[:, :, t] = _gather(top_values.view(B, K, top_n), parent)
                candidates.top_ids[:, :, t] = _gather(top_ids.view(B, K, top_n), parent)
            hits_eos = torch.isin(token, eos)  # (B, C)
            hits_stop = _stop_string_hits(tokenizer, candidates.tokens[:, :, :t + 1], config.stop)
            ends = hits_eos | hits_stop | (t + 1 == max_new)
            reasons = torch.where(hits_stop, 2, torch.where(hits_eos, 1, 0))  # a stop string wins, as in SequenceState

            # 3. the next running beams: the best K candidates that did not end
            keep = torch.topk(cand_scores + ends.float() * NEG, K, dim=-1).indices  # (B, K)
            running = candidates.gather(keep)
            running_scores = _gather(cand_scores + ends.float() * NEG, keep)
            rows = (row_base + _gather(parent, keep)).view(-1)  # (B*K,) the row each new beam continues

            # 2. offer the candidates that ended to the finished set
            just_finished = ends & top_k_mask[None, :]
            offered = cand_scores / ((t + 1) ** config.length_penalty)
            full = is_finished.all(dim=-1, keepdim=True) & (config.early_stopping is True)
            offered = offered + full.float() * NEG + (~can_improve).float() * NEG + (~just_finished).float() * NEG
            merged_scores = torch.cat((finished_scores, offered), dim=1)  # (B, K + C)
            best = torch.topk(merged_scores, K, dim=-1).indices
            finished = finished.cat(candidates).gather(best)
            finished_scores = _gather(merged_scores, best)
            finished_lengths = _gather(torch.cat((finished_lengths, torch.full_like(token, t + 1)), dim=1), best)
            finished_reasons = _gather(torch.cat((finished_reasons, reasons), dim=1), best)
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

            next_tokens = running.tokens[:, :, t].reshape(B * K)
            session.reorder(rows)
            if counts is not None:
                counts.reorder(rows)
                counts.add(next_tokens)
            logits = session.decode(next_tokens)
            stats.decode_steps += 1
        stats.decode_s = time.perf_counter() - start

    beams = [[_beam(finished, finished_scores, finished_lengths, finished_reasons, b, k, tokenizer, config)
              for k in range(config.num_return_sequences)] for b in range(B)]
    stats.new_tokens = sum(len(h[0].token_ids) for h in beams)
    return GenerationOutput(
        token_ids=[h[0].token_ids for h in beams],
        texts=[h[0].text or "" for h in beams] if tokenizer is not None else None,
        finish_reasons=[h[0].finish_reason for h in beams],
        logprobs=[h[0].logprobs for h in beams] if config.logprobs else None,
        top_logprobs=[h[0].top_logprobs for h in beams] if top_n else None,
        beams=beams, stats=stats)


def _stop_string_hits(tokenizer: TokenizerLike | None, tokens: torch.Tensor, stop: list[str]) -> torch.Tensor:
    """(B, C) True where a candidate's decoded text (tokens (B, C, t)) contains a stop string. A running beam
    never contains one (it would have ended), so a hit is always completed by the candidate's new token."""
    if not stop:
        return torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    hits = [[any(s in tokenizer.decode(seq, skip_special_tokens=True) for s in stop) for seq in row]
            for row in tokens.tolist()]
    return torch.tensor(hits, dtype=torch.bool, device=tokens.device)


def _beam(finished: _Hypotheses, scores: torch.Tensor, lengths: torch.Tensor, reasons: torch.Tensor, b: int,
          k: int, tokenizer: TokenizerLike | None, config: GenerationConfig) -> Beam:
    """Finished hypothesis k of prompt b, its text cut before a stop string that ended it."""
    n = int(lengths[b, k])
    reason = REASONS[int(reasons[b, k])]
    ids = finished.tokens[b, k, :n].tolist()
    text = None
    if tokenizer is not None:
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if reason == "stop":
            text = text[:min(i for i in (text.find(s) for s in config.stop) if i >= 0)]
    logprobs = finished.logprobs[b, k, :n].tolist() if config.logprobs else None
    top = None
    if config.top_logprobs:
        top = [dict(zip(i, v)) for i, v in zip(finished.top_ids[b, k, :n].tolist(),
                                                finished.top_values[b, k, :n].tolist())]
    return Beam(ids, float(scores[b, k]), text, reason, logprobs, top)
