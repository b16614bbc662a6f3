"""Greedy and sampled generation of a batch of prompts: one request of a ContinuousBatch, run to the end.

    prefill: every prompt into its own row (slots [0, len), no padding), last-token logits (B, V)
    step:    choose a token per row, sync once (the stop test), decode the tokens -> logits (B, V)

The cache has max prompt length + max_new_tokens slots (rounded up for compiled runs); each row stops on
its own (EOS, a stop string, its max_new_tokens, or the context filling up: "length").

Shapes: B prompts, V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from lmstack.errors import GenerationError
from lmstack.generate.config import GenerationConfig
from lmstack.generate.continuous import ContinuousBatch
from lmstack.generate.prompts import PromptInput, TokenizerLike, prepare_prompts
from lmstack.generate.results import GenerationOutput, GenerationStats, StreamEvent, build_output
from lmstack.generate.session import cache_length
from lmstack.generate.stopping import SequenceState
from lmstack.model.protocol import CausalLM


class GenerationRun:
    """One batched generation. Iterate `events()` to stream; `output()` gives the result afterwards."""

    def __init__(self, model: CausalLM, tokenizer: TokenizerLike | None, prompts: PromptInput,
                 config: GenerationConfig):
        if config.num_beams > 1:
            raise GenerationError("GenerationRun does greedy/sampled decoding; beam search runs in "
                                  "lmstack.generate.beam")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.prompts = prepare_prompts(model, tokenizer, prompts, config)
        self.sequences: list[SequenceState] = []  # per prompt, filled as `events()` starts
        self.stats = GenerationStats(prompt_tokens=sum(len(p) for p in self.prompts), batch_size=len(self.prompts))

    def events(self) -> Iterator[StreamEvent]:
        """Generate, yielding a StreamEvent per row per step until every row has finished."""
        model, config, prompts = self.model, self.config, self.prompts
        S = cache_length(max(len(p) for p in prompts), config.max_new_tokens, model.config.max_seq_len,
                         config.compile)
        with ContinuousBatch(model, self.tokenizer, len(prompts), S, config.compile) as batch:
            start = time.perf_counter()
            rows = batch.add_group(prompts, config)  # rows 0 .. B-1
            self.sequences = [batch.sequence(row) for row in rows]
            first_step = True
            while batch.has_running():
                yield from batch.step()
                if first_step:  # prefill ends when the first tokens are on the host
                    self.stats.prefill_s = batch.synced_at - start
                    start, first_step = batch.synced_at, False
            self.stats.decode_s = time.perf_counter() - start
            self.stats.decode_steps = batch.decode_steps
            self.stats.new_tokens = sum(len(s.ids) for s in self.sequences)

    def output(self) -> GenerationOutput:
        """The result (call after `events()` is exhausted)."""
        return build_output(self.sequences, self.tokenizer, self.config, self.stats)
