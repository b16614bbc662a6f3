"""Next-token selection: penalties, the sampling filters (temperature, top-k, top-p, min-p) and the draw.

Every function works on a whole batch of fp32 logits (B, V) with no host synchronisation, so the decode
loop's only sync stays the stop test. Filters follow transformers' logits warpers exactly (same order,
same tie and keep-at-least-one rules), so a seeded run is comparable to theirs in distribution.
"""

from __future__ import annotations

import torch

from lmstack.generate.config import GenerationConfig


def make_generator(config: GenerationConfig, device: torch.device) -> torch.Generator | None:
    """The private random stream of one request: seeded with config.seed, else from the OS; None when greedy."""
    if not config.do_sample:
        return None
    generator = torch.Generator(device=device)
    if config.seed is not None:
        generator.manual_seed(config.seed)
    else:
        generator.seed()
    return generator


class TokenCounts:
    """Per-row token statistics the penalties need: which ids the prompt holds and how often each id was
    generated. Kept on the device as (B, V) tensors and updated in place each step (no sync)."""

    def __init__(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, vocab_size: int):
        """prompt_ids (B, P) padded, prompt_mask (B, P) 1 on real tokens."""
        B = prompt_ids.shape[0]
        # Padding must not count: send pad positions to a throwaway column, then drop it.
        scratch = torch.zeros(B, vocab_size + 1, dtype=torch.bool, device=prompt_ids.device)
        ids = torch.where(prompt_mask.bool(), prompt_ids, vocab_size)
        scratch.scatter_(1, ids, True)
        self.in_prompt = scratch[:, :vocab_size]
        self.generated = torch.zeros(B, vocab_size, dtype=torch.float32, device=prompt_ids.device)

    @classmethod
    def from_prompts(cls, prompts: list[list[int]], vocab_size: int, device: torch.device) -> TokenCounts:
        """From B prompts of any lengths."""
        P = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), P, dtype=torch.long)
        mask = torch.zeros(len(prompts), P, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            mask[row, :len(prompt)] = 1
        return cls(ids.to(device), mask.to(device), vocab_size)

    def add(self, tokens: torch.Tensor) -> None:
        """Count one generated token per row: tokens (B,)."""
        self.generated.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=torch.float32))

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row i continues row rows[i]."""
        self.in_prompt = self.in_prompt.index_select(0, rows)
        self.generated = self.generated.index_select(0, rows)


def apply_penalties(logits: torch.Tensor, counts: TokenCounts, config: GenerationConfig) -> torch.Tensor:
    """logits (B, V) -> penalised logits (B, V).

    Repetition penalty (transformers' RepetitionPenaltyLogitsProcessor, from CTRL): every id seen in the
    prompt or the output has its logit divided by the penalty when positive, multiplied when negative.
    Presence/frequency penalties (OpenAI): logit -= presence * [count > 0] + frequency * count, over the
    generated tokens only.
    """
    if config.repetition_penalty != 1.0:
        seen = counts.in_prompt | (counts.generated > 0)
        penalised = torch.where(logits < 0, logits * config.repetition_penalty, logits / config.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if config.presence_penalty != 0.0 or config.frequency_penalty != 0.0:
        logits = (logits - config.presence_penalty * (counts.generated > 0).to(logits.dtype)
                  - config.frequency_penalty * counts.generated)
    return logits


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0) -> torch.Tensor:
    """logits (B, V) -> tempered logits with the filtered-out tokens at -inf. At least one token always survives."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        # Like transformers: keep every token scoring at least the k-th best (ties kept).
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Sort ascending and drop the low tail whose total mass is <= 1 - top_p; the best token always stays.
        sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
        drop_sorted = cumulative <= (1 - top_p)
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, sorted_ids, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(dim=-1)
        threshold = min_p * probs.amax(dim=-1, keepdim=True)  # (B, 1)
        logits = logits.masked_fill(probs < threshold, float("-inf"))  # the top token is never below it
    return logits


def sample_from_logits(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one id per row from softmax(logits): (B, V) -> (B,).

    argmax(p / E) with E ~ Exponential(1) picks i with probability p_i (the exponential-race form of the
    Gumbel-max trick): no cumulative sum, no host sync, compile-friendly, and reproducible with a seeded
    generator.
    """
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


def next_tokens(logits: torch.Tensor, config: GenerationConfig, counts: TokenCounts | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """The full selection step: raw fp32 logits (B, V) -> chosen ids (B,) (greedy when temperature == 0)."""
    if counts is not None and config.uses_penalties:
        logits = apply_penalties(logits, counts, config)
    if not config.do_sample:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits, config.temperature, config.top_k, config.top_p, config.min_p)
    return sample_from_logits(filtered, generator)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probabilities under the raw model distribution (before penalties and filters, as vLLM reports them).

    logits (B, V), tokens (B,) -> chosen (B,), and with top_n > 0 the top_n (values (B, n), ids (B, n)).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens[:, None])[:, 0]
    if top_n <= 0:
        return chosen, None, None
    values, ids = torch.topk(logp, min(top_n, logp.shape[-1]), dim=-1)
    return chosen, values, ids
