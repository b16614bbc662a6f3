"""OpenAI response bodies and stream chunks, built from the scheduler's events.

Completions: `text_completion` objects; `logprobs` as {tokens, token_logprobs, top_logprobs, text_offset}
with the prompt's tokens first under `echo`. Chat: `chat.completion` / `chat.completion.chunk`; a stream
sends each choice's role first (`delta: {role, content: ""}`), then content deltas, then an empty delta
with its finish_reason, and with `include_usage` exactly one last chunk with `choices: []` and the usage.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

# lmstack's finish reasons -> OpenAI's: an end-of-sequence token and a stop string are both "stop".
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class TokenText:
    """Token ids -> the strings OpenAI's logprobs show: each id decoded alone (as vLLM does)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self._cache:
            self._cache[token_id] = self.tokenizer.decode([token_id])
        return self._cache[token_id]

    def top(self, alternatives: dict[int, float] | None) -> dict[str, float] | None:
        if alternatives is None:
            return None
        out: dict[str, float] = {}
        for token_id, value in alternatives.items():  # most likely first; equal strings keep the likelier
            out.setdefault(self(token_id), value)
        return out


class CompletionLogprobs:
    """The completions `logprobs` object, grown token by token (text_offset counts characters of `text`)."""

    def __init__(self, names: TokenText, offset: int = 0):
        self.names, self.offset = names, offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, token_id: int, logprob: float | None, top: dict[int, float] | None) -> None:
        name = self.names(token_id)
        self.tokens.append(name)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(self.names.top(top))
        self.text_offset.append(self.offset)
        self.offset += len(name)

    def body(self, start: int = 0) -> dict[str, Any]:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}


def chat_logprob_entry(names: TokenText, token_id: int, logprob: float, top: dict[int, float] | None
                       ) -> dict[str, Any]:
    """One token of a chat `logprobs.content` list."""
    def item(name: str, value: float) -> dict[str, Any]:
        return {"token": name, "logprob": value, "bytes": list(name.encode("utf-8"))}

    entry = item(names(token_id), logprob)
    entry["top_logprobs"] = [item(names(i), v) for i, v in (top or {}).items()]
    return entry


def completion_body(request_id: str, model: str, created: int, choices: list[dict[str, Any]],
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chat_body(request_id: str, model: str, created: int, choices: list[dict[str, Any]],
              prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


class ChunkWriter:
    """Stream chunks of one request: the same id, model and creation time on each."""

    def __init__(self, kind: str, model: str, include_usage: bool):
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.model, self.created, self.include_usage = model, int(time.time()), include_usage

    def chunk(self, choices: list[dict[str, Any]]) -> str:
        body: dict[str, Any] = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                                "choices": choices}
        if self.include_usage:
            body["usage"] = None
        return sse(body)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> str:
        return sse({"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                    "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
