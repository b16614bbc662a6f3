"""What generation returns: the output of one `generate` call, its timing, beam hypotheses, stream events."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.generate.config import GenerationConfig
from lmstack.generate.prompts import TokenizerLike
from lmstack.generate.stopping import FinishReason, SequenceState


@dataclass
class GenerationStats:
    """Where the time went. Prefill ends when the first new token is on the host."""

    prompt_tokens: int = 0  # prompt tokens over the batch
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
    finish_reason: FinishReason = "length"
    logprobs: list[float] | None = None  # log p(token) under the raw model, per generated token
    top_logprobs: list[dict[int, float]] | None = None  # the top_logprobs alternatives, per generated token


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


@dataclass
class StreamEvent:
    """One streamed piece: `text` is the newly safe text of row `row` ('' while a character or a possible
    stop string is incomplete); `token_id` is None for a final flush after the sequence finished."""

    row: int
    token_id: int | None
    text: str
    finished: bool


def build_output(sequences: list[SequenceState], tokenizer: TokenizerLike | None, config: GenerationConfig,
                 stats: GenerationStats) -> GenerationOutput:
    """The output of sequences decoded one token per step (sampling, greedy, speculative)."""
    return GenerationOutput(
        token_ids=[s.ids for s in sequences],
        texts=[s.text for s in sequences] if tokenizer is not None else None,
        finish_reasons=[s.finish_reason or "length" for s in sequences],
        logprobs=[s.logprobs for s in sequences] if config.logprobs else None,
        top_logprobs=[s.top_logprobs for s in sequences] if config.top_logprobs else None,
        stats=stats,
    )
