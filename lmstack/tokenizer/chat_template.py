"""Chat templates: Jinja2 with Hugging Face semantics, plus the spans of assistant text for loss masking.

A chat template is the Jinja2 source stored as `chat_template` in tokenizer_config.json. It sees
`messages` (a list of {"role", "content"} dicts), `add_generation_prompt`, the special tokens
(`bos_token`, `eos_token`, ...) and `raise_exception(msg)`, and renders one string. The environment
matches transformers' (sandboxed, `trim_blocks`, `lstrip_blocks`, `loopcontrols`, a `tojson` that keeps
non-ASCII), so a template renders to the identical string in lmstack and in
`AutoTokenizer.apply_chat_template`.

Assistant spans: a template may wrap what the model must learn to produce in
`{% generation %}...{% endgeneration %}` (the transformers convention behind
`return_assistant_tokens_mask`). We render those blocks between two private-use sentinel characters
and strip them afterwards, which gives exact character spans without re-implementing Jinja's output
bookkeeping. Templates without the tag (most third-party ones) fall back to prefix differencing: the
assistant turn i is the text between render(messages[:i], add_generation_prompt=True) and
render(messages[:i+1]).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmstack.errors import ChatTemplateError

# ChatML (OpenAI / Qwen style). The assistant content and its closing <|im_end|> are the trained span.
CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama-3 style: bos once, a header per turn, <|eot_id|> closes each turn (content is stripped, as in Meta's template).
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"chatml": CHATML, "llama3": LLAMA3}

# Special tokens each built-in template needs in the vocabulary (added by train_tokenizer / the CLI).
TEMPLATE_SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
}

_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")

# Private-use code points: never produced by a tokenizer's normaliser, and rejected in message content.
_GEN_START, _GEN_END = "\ue000", "\ue001"


def resolve_template(name_or_path: str) -> str:
    """'chatml' | 'llama3' -> the built-in source; otherwise read a Jinja file at that path."""
    if name_or_path in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ChatTemplateError(
            f"chat template {name_or_path!r}: not a built-in ({', '.join(BUILTIN_TEMPLATES)}) and no such file")
    return path.read_text(encoding="utf-8")


class _GenerationTag(Extension):
    """`{% generation %}body{% endgeneration %}`: renders body between sentinels when marking is on."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_wrap", [jinja2.nodes.Name("__lmstack_mark_generation", "load")])
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _wrap(self, mark: bool, caller: Any) -> str:
        text = caller()
        return f"{_GEN_START}{text}{_GEN_END}" if mark else text


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers' override: Jinja's own tojson escapes HTML characters and non-ASCII, theirs does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template line {e.lineno}: {e.message}") from None


def _check_messages(messages: list[dict[str, Any]]) -> None:
    if not isinstance(messages, list):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatTemplateError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        if isinstance(m["content"], str) and (_GEN_START in m["content"] or _GEN_END in m["content"]):
            raise ChatTemplateError(f"messages[{i}].content contains a reserved private-use character U+E000/U+E001")


def render(source: str, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
           special_tokens: dict[str, str | None] | None = None, **extra: Any) -> str:
    """Render `messages` with the template `source`, exactly as transformers' apply_chat_template(tokenize=False)."""
    _check_messages(messages)
    return _render(source, messages, add_generation_prompt, special_tokens or {}, mark=False, extra=extra)


def _render(source: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
            special_tokens: dict[str, str | None], mark: bool, extra: dict[str, Any]) -> str:
    template = _compile(source)
    # as in transformers, caller variables override the special tokens of the same name
    variables = {**special_tokens, **extra, "messages": messages, "add_generation_prompt": add_generation_prompt,
                 "__lmstack_mark_generation": mark}
    try:
        return template.render(**variables)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from None
    except (TypeError, KeyError, IndexError, AttributeError) as e:  # e.g. a message whose content is not a string
        raise ChatTemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None


def render_with_assistant_spans(source: str, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                                special_tokens: dict[str, str | None] | None = None, **extra: Any
                                ) -> tuple[str, list[tuple[int, int]]]:
    """Render and return (text, [(start, end) character spans of assistant output]).

    With `{% generation %}` blocks the spans are exactly those blocks; otherwise each assistant turn's
    span is found by prefix differencing, which needs a template whose render of a prefix of the
    conversation is a prefix of the full render (true of ChatML, Llama-3, Mistral and most others).
    """
    _check_messages(messages)
    special_tokens = special_tokens or {}
    if _GENERATION_TAG.search(source):
        marked = _render(source, messages, add_generation_prompt, special_tokens, mark=True, extra=extra)
        return _strip_sentinels(marked)
    text = _render(source, messages, add_generation_prompt, special_tokens, mark=False, extra=extra)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(source, messages[:i], True, special_tokens, mark=False, extra=extra)
        through = _render(source, messages[: i + 1], False, special_tokens, mark=False, extra=extra)
        if not (through.startswith(before) and text.startswith(through)):
            raise ChatTemplateError(
                f"cannot locate assistant turn {i}: this template's rendering of a shorter conversation is not "
                "a prefix of the full one; wrap assistant output in {% generation %}...{% endgeneration %}")
        # The span starts after the generation prompt and ends where the turn's render ends, minus any
        # trailing separator the template emits between turns (kept out of the loss, like ChatML's '\n').
        start, end = len(before), len(through)
        end = start + len(text[start:end].rstrip())
        content = m["content"].strip() if isinstance(m["content"], str) else ""
        found = text.find(content, start, end) if content else -1
        if found >= 0:
            start = found
        spans.append((start, end))
    return text, spans


def _strip_sentinels(marked: str) -> tuple[str, list[tuple[int, int]]]:
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    length, start = 0, None
    for piece_index, piece in enumerate(marked.split(_GEN_START)):
        if piece_index > 0:
            start = length
        inside, sep, after = piece.partition(_GEN_END)
        if not sep:  # no closing sentinel in this piece: all of it is outside a block
            out.append(piece)
            length += len(piece)
            continue
        out.append(inside)
        length += len(inside)
        if start is not None:
            spans.append((start, length))
            start = None
        out.append(after)
        length += len(after)
    return "".join(out), spans
