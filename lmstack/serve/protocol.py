"""The OpenAI wire format: request bodies parsed into typed dataclasses, and the errors as OpenAI's JSON.

Bodies are parsed by hand rather than by a FastAPI model so that every mistake becomes OpenAI's error
object, `{"error": {"message", "type", "param", "code"}}` with status 400, naming the field, instead of
FastAPI's 422 layout. Unknown fields are errors too (OpenAI's "Unrecognized request argument"), except
the few that change nothing here (`user`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

# Sampling extras that vLLM accepts beside OpenAI's fields (the openai client sends them as extra_body).
EXTRA_SAMPLING = ("top_k", "min_p", "repetition_penalty", "ignore_eos")
MAX_LOGPROBS = 20


class APIError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status."""

    TYPES: ClassVar[dict[int, str]] = {400: "invalid_request_error", 401: "authentication_error",
                                       404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param, "invalid_value" if param else None)


# ------------------------------------------------------------------------------------------- field readers


def _number(body: dict, key: str, default: float | None, low: float | None = None, high: float | None = None,
            integer: bool = False) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _bad(f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", key)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise _bad(f"'{key}' must be {bounds}, got {value!r}", key)
    return value


def _boolean(body: dict, key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"'{key}' must be true or false, got {value!r}", key)
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise _bad(f"'stop' must be a non-empty string or a list of up to 4 of them, got {value!r}", "stop")
    return stops


def _include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _bad(f"'stream_options' takes {{\"include_usage\": bool}}, got {options!r}", "stream_options")
    return _boolean(options, "include_usage", False)


def _check_fields(body: Any, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _bad(f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0])
    return body


@dataclass
class Sampling:
    """The per-request decoding settings common to both endpoints (GenerationConfig fields, by OpenAI's names)."""

    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False

    @classmethod
    def read(cls, body: dict, max_tokens: int | None) -> Sampling:
        stream = _boolean(body, "stream", False)
        return cls(max_tokens=max_tokens,
                   temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                   top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
                   n=_number(body, "n", 1, 1, 16, integer=True),
                   stop=_stop(body),
                   seed=_number(body, "seed", None, integer=True),
                   presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
                   frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
                   top_k=_number(body, "top_k", 0, 0, integer=True),
                   min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
                   repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01),
                   ignore_eos=_boolean(body, "ignore_eos", False),
                   stream=stream, include_usage=_include_usage(body, stream))


COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty",
          "frequency_penalty", "stream", "stream_options", "user", *EXTRA_SAMPLING}


@dataclass
class CompletionRequest:
    """POST /v1/completions. `prompts`: text or token ids, one entry per prompt (a list prompt is a batch)."""

    model: str | None
    prompts: list[str | list[int]]
    sampling: Sampling
    echo: bool = False
    logprobs: int | None = None  # None = none; k = the chosen token's and the k most likely

    @classmethod
    def parse(cls, body: Any) -> CompletionRequest:
        body = _check_fields(body, COMMON | {"prompt", "echo", "logprobs", "best_of", "suffix", "logit_bias"})
        if body.get("suffix") is not None:
            raise _bad("'suffix' (insertion) is not supported", "suffix")
        if body.get("logit_bias"):
            raise _bad("'logit_bias' is not supported", "logit_bias")
        prompts = _prompts(body.get("prompt"))
        max_tokens = _number(body, "max_tokens", 16, 0, integer=True)
        echo = _boolean(body, "echo", False)
        if max_tokens == 0 and not echo:
            raise _bad("'max_tokens' = 0 is only allowed with 'echo': true (scoring the prompt)", "max_tokens")
        sampling = Sampling.read(body, max_tokens)
        best_of = _number(body, "best_of", None, 1, integer=True)
        if best_of is not None and best_of != sampling.n:
            raise _bad(f"'best_of' other than n is not supported (got best_of={best_of}, n={sampling.n})", "best_of")
        logprobs = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
        if sampling.stream and echo and max_tokens == 0:
            raise _bad("'echo' with 'max_tokens' = 0 cannot stream: nothing is generated", "stream")
        return cls(body.get("model"), prompts, sampling, echo, logprobs)


def _prompts(value: Any) -> list[str | list[int]]:
    def ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(value, str):
        return [value]
    if ids(value):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str) or ids(p) for p in value):
        return list(value)
    raise _bad("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists "
               f"(non-empty), got {str(value)[:60]!r}", "prompt")


@dataclass
class ChatRequest:
    """POST /v1/chat/completions: the messages are rendered with the model's chat template."""

    model: str | None
    messages: list[dict[str, str]]
    sampling: Sampling
    logprobs: bool = False
    top_logprobs: int = 0

    @classmethod
    def parse(cls, body: Any) -> ChatRequest:
        body = _check_fields(body, COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"})
        messages = _messages(body.get("messages"))
        max_tokens = _number(body, "max_completion_tokens", None, 1, integer=True)
        if max_tokens is None:
            max_tokens = _number(body, "max_tokens", None, 1, integer=True)
        logprobs = _boolean(body, "logprobs", False)
        top = _number(body, "top_logprobs", 0, 0, MAX_LOGPROBS, integer=True)
        if top and not logprobs:
            raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return cls(body.get("model"), messages, Sampling.read(body, max_tokens), logprobs, top)


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            raise _bad(f"{where} needs a 'role' of system, user or assistant, got {str(message)[:60]!r}", where)
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"{where}.content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported",
                           where)
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"{where}.content must be a string, got {str(content)[:60]!r}", where)
        role = "system" if message["role"] == "developer" else message["role"]
        out.append({"role": role, "content": content})
    return out
