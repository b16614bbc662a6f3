"""Per-sequence bookkeeping on the host: the tokens so far, their text, and when the sequence stops.

A sequence stops on an EOS id ("eos"), on a stop string appearing in its decoded text ("stop"; the
text is cut before the stop string, as OpenAI's API does), or after max_new_tokens ("length").
Streamed text never contains part of a stop string: a tail that could still grow into one is held back
until it either completes the stop string or stops matching.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from lmstack.generate.config import GenerationConfig
from lmstack.generate.prompts import TokenizerLike

FinishReason = Literal["eos", "stop", "length"]


def resolve_eos_ids(model: Any, tokenizer: TokenizerLike | None, config: GenerationConfig) -> set[int]:
    """EOS ids: the config's, else the model config's plus the tokenizer's (model: a CausalLM)."""
    if config.ignore_eos:
        return set()
    if config.eos_token_ids is not None:
        return set(config.eos_token_ids)
    ids = set(model.config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class SequenceState:
    """One generated sequence: ids, optional logprobs, decoded text and the finish reason."""

    def __init__(self, tokenizer: TokenizerLike | None, prompt_ids: Sequence[int], eos_ids: set[int],
                 stop: Sequence[str], max_new_tokens: int):
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        self.finish_reason: FinishReason | None = None
        self.text = ""
        self._emitted = 0  # characters of self.text already handed to the caller
        self._eos_ids = eos_ids
        self._stop = list(stop)
        self._max_new_tokens = max_new_tokens
        self._decoder = None
        if tokenizer is not None:
            from lmstack.tokenizer import StreamDecoder  # the decoder handles partial UTF-8 and context

            # The prompt's last ids give context (a Metaspace/WordPiece decoder's leading-space rules).
            self._decoder = StreamDecoder(tokenizer, skip_special_tokens=True, prompt_ids=prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int, logprob: float | None = None, top: dict[int, float] | None = None) -> str:
        """Add one generated token; return the text that is now safe to show ('' if none)."""
        self.ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if top is not None:
            self.top_logprobs.append(top)
        if self._decoder is not None:
            before = len(self.text)
            self.text += self._decoder.push(token)
            if self._stop and self._cut_at_stop_string(before):
                self.finish_reason = "stop"
        if self.finish_reason is None:
            if token in self._eos_ids:
                self.finish_reason = "eos"
            elif len(self.ids) >= self._max_new_tokens:
                self.finish_reason = "length"
        if self.finish_reason is not None and self._decoder is not None and self.finish_reason != "stop":
            self.text += self._decoder.flush()  # an incomplete character at the very end shows as U+FFFD
            if self._stop:
                self._cut_at_stop_string(0)
        return self._take_safe_text()

    def force_finish(self, reason: FinishReason) -> str:
        """End the sequence from outside (e.g. the context is full); return any text still held back."""
        if self.finish_reason is None:
            self.finish_reason = reason
            if self._decoder is not None:
                self.text += self._decoder.flush()
        return self._take_safe_text()

    def _cut_at_stop_string(self, searched_up_to: int) -> bool:
        """Truncate self.text before the earliest stop string that ends in the new text; True if one did."""
        best = None
        for stop in self._stop:
            index = self.text.find(stop, max(0, searched_up_to - len(stop) + 1))
            if index >= 0 and (best is None or index < best):
                best = index
        if best is None:
            return False
        self.text = self.text[:best]
        return True

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        if self.finished or not self._stop:
            return 0
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _take_safe_text(self) -> str:
        end = len(self.text) - self._held_back()
        if end <= self._emitted:
            return ""
        piece = self.text[self._emitted:end]
        self._emitted = end
        return piece
