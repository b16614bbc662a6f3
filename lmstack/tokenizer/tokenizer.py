"""`Tokenizer`: a `tokenizers.Tokenizer` (the Rust backend; tokenizer.json is the on-disk format) with what a
model needs around it: the special tokens by role (bos / eos / pad / unk / cls / sep / mask, plus extra ones
such as ChatML's <|im_start|>), and the chat template. A saved directory holds tokenizer.json,
tokenizer_config.json (with `chat_template`) and special_tokens_map.json, which
`transformers.AutoTokenizer.from_pretrained` loads and encodes identically.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from lmstack.atomic import atomic_dir, write_text
from lmstack.errors import TokenizerError
from lmstack.schema import json_error, read_text
from lmstack.tokenizer import chat_template as templates
from lmstack.tokenizer.special import ROLES, SpecialTokens


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its special tokens and chat template (the tokenizer_config.json side)."""

    def __init__(self, backend: tokenizers.Tokenizer, special_tokens: SpecialTokens,
                 chat_template: str | None = None, config: dict[str, Any] | None = None) -> None:
        # lmstack never pads or truncates inside the tokenizer (the data pipeline and collators do), and
        # neither does transformers unless asked per call; a tokenizer.json may still carry settings for both.
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.special_tokens = special_tokens
        self.chat_template = chat_template
        # Other tokenizer_config.json keys (model_max_length, do_lower_case, ...) kept through load/save.
        self.config: dict[str, Any] = dict(config or {})

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load a tokenizer directory (tokenizer.json + tokenizer_config.json [+ special_tokens_map.json])."""
        directory = Path(directory)
        if not directory.is_dir():
            raise TokenizerError(f"{directory}: no such tokenizer directory")
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{directory}: no tokenizer.json (lmstack reads the `tokenizers` format; convert "
                                 "a vocab.txt / tokenizer.model-only tokenizer with transformers first)")
        text = read_text(path, TokenizerError)
        _read_json_text(text, path)  # a JSON syntax error is reported with its line and column
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises a bare Exception with serde's message
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None
        config = _read_json_object(directory / "tokenizer_config.json")
        token_map = _read_json_object(directory / "special_tokens_map.json")
        where = directory / "tokenizer_config.json"
        roles: dict[str, str | None] = {}
        for role in ROLES:
            value = config.get(f"{role}_token", token_map.get(f"{role}_token"))
            roles[role] = _token_content(value, f"{where}: {role}_token")
        extra_value = (config.get("additional_special_tokens") or config.get("extra_special_tokens")
                       or token_map.get("additional_special_tokens") or [])
        if isinstance(extra_value, dict):  # transformers v5 may store named extras
            extra_value = list(extra_value.values())
        extra = tuple(t for t in (_token_content(v, f"{where}: additional_special_tokens") for v in extra_value)
                      if t is not None)
        chat = _read_chat_template(directory, config)
        kept = {k: v for k, v in config.items() if not _is_managed_key(k)}
        return cls(backend, SpecialTokens(**roles, extra=extra), chat, kept)

    def files(self) -> dict[str, str]:
        """{"tokenizer.json": text, "tokenizer_config.json": text, "special_tokens_map.json": text}."""
        roles = self.special_tokens.roles()
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",  # the generic tokenizer.json-backed class
            **self.config,
            **{f"{r}_token": t for r, t in roles.items()},
        }
        if self.special_tokens.extra:
            config["additional_special_tokens"] = list(self.special_tokens.extra)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        token_map: dict[str, Any] = {f"{r}_token": t for r, t in roles.items()}
        if self.special_tokens.extra:
            token_map["additional_special_tokens"] = list(self.special_tokens.extra)
        return {
            "tokenizer.json": self.backend.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            "special_tokens_map.json": json.dumps(token_map, indent=2, ensure_ascii=False) + "\n",
        }

    def save(self, directory: str | Path) -> None:
        """Write the three files. A new directory appears whole or not at all; into an existing one (a
        checkpoint) each file is replaced atomically and the other files there are left alone."""
        directory = Path(directory)
        files = self.files()
        if directory.exists():
            if not directory.is_dir():
                raise TokenizerError(f"{directory}: exists and is not a directory")
            for name, text in files.items():
                write_text(directory / name, text)
            return
        with atomic_dir(directory) as tmp:
            for name, text in files.items():
                (tmp / name).write_text(text, encoding="utf-8")

    def sha256(self) -> str:
        """SHA-256 of the canonical tokenizer.json: identifies the token ids a shard holds.

        Canonical = sorted keys, compact separators, UTF-8, and floats (unigram scores) rounded to 12
        significant digits, because the Rust JSON reader does not parse floats exactly: a saved and
        reloaded unigram tokenizer differs from the trained one in the last bits of its scores.
        """
        canonical = json.dumps(_round_floats(json.loads(self.backend.to_str())), sort_keys=True,
                               separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------ vocabulary and special tokens
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (= len(AutoTokenizer)); an embedding needs at least this many rows."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def model_type(self) -> str:
        """The tokenizers model: 'BPE', 'WordPiece', 'Unigram' or 'WordLevel' (the char kind)."""
        return type(self.backend.model).__name__

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def _role_id(self, role: str) -> int | None:
        token = getattr(self.special_tokens, role)
        return None if token is None else self.backend.token_to_id(token)

    # <role>_token / <role>_token_id for every role, named as in transformers (bos_token_id, pad_token, ...)
    bos_token = property(lambda self: self.special_tokens.bos, doc="the bos token text, or None")
    eos_token = property(lambda self: self.special_tokens.eos, doc="the eos token text, or None")
    pad_token = property(lambda self: self.special_tokens.pad, doc="the pad token text, or None")
    unk_token = property(lambda self: self.special_tokens.unk, doc="the unk token text, or None")
    cls_token = property(lambda self: self.special_tokens.cls, doc="the cls token text, or None")
    sep_token = property(lambda self: self.special_tokens.sep, doc="the sep token text, or None")
    mask_token = property(lambda self: self.special_tokens.mask, doc="the mask token text, or None")
    bos_token_id = property(lambda self: self._role_id("bos"), doc="id of the bos token, or None")
    eos_token_id = property(lambda self: self._role_id("eos"), doc="id of the eos token, or None")
    pad_token_id = property(lambda self: self._role_id("pad"), doc="id of the pad token, or None")
    unk_token_id = property(lambda self: self._role_id("unk"), doc="id of the unk token, or None")
    cls_token_id = property(lambda self: self._role_id("cls"), doc="id of the cls token, or None")
    sep_token_id = property(lambda self: self._role_id("sep"), doc="id of the sep token, or None")
    mask_token_id = property(lambda self: self._role_id("mask"), doc="id of the mask token, or None")

    @property
    def all_special_ids(self) -> list[int]:
        ids = (self.backend.token_to_id(t) for t in self.special_tokens.all())
        return [i for i in ids if i is not None]

    # ------------------------------------------------------------------ encoding and decoding
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids (T,). `add_special_tokens` applies the post-processor (bos for bpe/unigram/char,
        [CLS] ... [SEP] for wordpiece); the default is off because packing inserts its own eos."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """B texts -> B id lists of their own lengths (no padding), encoded in parallel by the Rust backend."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        """Text -> token strings (the pieces as the vocabulary spells them, e.g. 'Ġworld', '##ing', '▁the')."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).tokens

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Ids (T,) -> text. An id outside the vocabulary is an error (the backend would silently drop it)."""
        ids = [int(i) for i in ids]
        size = self.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= size):
            bad = next(i for i in ids if not 0 <= i < size)
            raise TokenizerError(f"token id {bad} is outside the vocabulary (size {size})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def _template_variables(self) -> dict[str, str]:
        # transformers passes the named special tokens that are set (unset ones stay undefined -> '').
        return {f"{r}_token": t for r, t in self.special_tokens.roles().items()}

    def _require_template(self) -> str:
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat_template; train or save it with one "
                                 "(`--chat-template chatml|llama3|PATH`) or set Tokenizer.chat_template")
        return self.chat_template

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False,
                            **template_variables: Any) -> str:
        """Render a conversation to text, exactly as transformers' apply_chat_template(tokenize=False).

        Extra keyword arguments (e.g. `tools=[...]`, `date_string=...`) are template variables, as in transformers.
        """
        return templates.render(self._require_template(), messages, add_generation_prompt,
                                self._template_variables(), **template_variables)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False,
                    **template_variables: Any) -> tuple[list[int], list[int]]:
        """Conversation -> (ids (T,), mask (T,)): mask is 1 on the tokens of assistant output, including the
        turn's end marker (<|im_end|> / <|eot_id|>), which SFT trains on; 0 on everything else.

        The text is encoded without extra special tokens: the template itself writes bos where the family
        wants it (as transformers' apply_chat_template(tokenize=True) does).
        """
        text, spans = templates.render_with_assistant_spans(self._require_template(), messages, add_generation_prompt,
                                                            self._template_variables(), **template_variables)
        encoding = self.backend.encode(text, add_special_tokens=False)
        mask = [0] * len(encoding.ids)
        span_index = 0
        for t, (start, end) in enumerate(encoding.offsets):
            # offsets and spans both ascend: walk them together; a token belongs to a span it overlaps
            while span_index < len(spans) and spans[span_index][1] <= start:
                span_index += 1
            if span_index < len(spans) and start < spans[span_index][1] and end > spans[span_index][0]:
                mask[t] = 1
        return list(encoding.ids), mask

    def __repr__(self) -> str:
        return (f"Tokenizer({self.model_type}, vocab_size={self.vocab_size}, special={self.special_tokens.all()}, "
                f"chat_template={'yes' if self.chat_template else 'no'})")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load a tokenizer directory (same as Tokenizer.load)."""
    return Tokenizer.load(directory)


def _round_floats(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, list):
        return [_round_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _round_floats(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------- tokenizer_config.json helpers
def _read_json_text(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}:{e.lineno}: corrupt JSON ({json_error(e)})") from None


def _read_json_object(path: Path) -> dict[str, Any]:
    """An optional JSON object file: {} when absent."""
    if not path.is_file():
        return {}
    value = _read_json_text(read_text(path, TokenizerError), path)
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_content(value: Any, where: str) -> str | None:
    # tokenizer_config.json stores a token as a string or as a serialized AddedToken {"content": ..., ...}
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where}: expected a token string or {{\"content\": ...}}, got {value!r}")


def _read_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    jinja = directory / "chat_template.jinja"  # where transformers >= 4.43 saves it
    if jinja.is_file():
        return read_text(jinja, TokenizerError)
    value = config.get("chat_template")
    if isinstance(value, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def _is_managed_key(key: str) -> bool:
    return (key in {"chat_template", "additional_special_tokens", "extra_special_tokens", "added_tokens_decoder"}
            or key.endswith("_token") and key[: -len("_token")] in ROLES)
