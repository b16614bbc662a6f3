"""Streaming detokenisation: token ids in, text out, never half a character.

Byte-level BPE pieces can end in the middle of a multi-byte UTF-8 sequence, which decodes to U+FFFD until
the next piece completes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmstack.tokenizer.tokenizer import Tokenizer


class StreamDecoder:
    """Incremental detokenisation that never emits part of a character (the scheme of vLLM / TGI).

    It keeps a short window of ids: `prefix` (already emitted) and the new ones. Each push decodes the
    window twice, without and with the new ids, and emits the difference, unless the longer text ends in
    U+FFFD: then a multi-byte character is still incomplete and nothing is emitted until it is. Decoding a
    window rather than single ids keeps context-dependent decoders right (Metaspace's leading space,
    WordPiece's '##' joins, byte-level merges across ids).
    """

    # ids of context decoded before the new ones: enough for any decoder's look-behind
    CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = [int(i) for i in prompt_ids]
        self._prefix = max(len(self._ids) - self.CONTEXT, 0)  # window start
        self._read = len(self._ids)  # everything before this index has been emitted (or is prompt)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the newly completed text ('' while a character is incomplete)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text):]

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes as U+FFFD) and reset the window."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = max(len(self._ids) - self.CONTEXT, 0)
        self._read = len(self._ids)
        return text[len(prefix_text):]
