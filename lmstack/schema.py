"""Typed dataclasses as the schema: strict loading from dicts, YAML files and `--a.b=value` overrides.

Every config in lmstack (model, data, training, generation) is a dataclass. This module turns
untrusted input (a YAML file, a JSON file, command-line overrides) into such a dataclass and
fails with the offending key's full dotted name when a key is unknown or a value has the wrong
type. Behaviour is never inferred from file names.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lmstack.errors import ConfigError

T = TypeVar("T")


def _key_error(key: str, message: str) -> ConfigError:
    """A ConfigError about one dotted key; `.key` lets the caller say where the value came from."""
    error = ConfigError(message)
    error.key = key
    return error


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting where lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1 and type(None) in args and ": expected " in errors[0]:  # Optional[X]: X's wording
            expected = errors[0].split(": expected ", 1)[1].rsplit(", got ", 1)[0]
            raise _key_error(key, f"{key}: expected {expected} or null, got {value!r}")
        raise _key_error(key, f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise _key_error(key, f"{key}: expected one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _key_error(key, f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise _key_error(key, f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _key_error(key, f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _key_error(key, f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads "1e-3" as a string; accept what float() reads
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _key_error(key, f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise _key_error(key, f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _key_error(key, f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _key_error(key, f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _key_error(key, f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types by dotted key name."""
    if not isinstance(data, dict):
        raise _key_error(prefix.rstrip("."), f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise _key_error(f"{prefix}{unknown[0]}", f"unknown key {prefix}{unknown[0]!s} (known keys: {known})")
    data = {name: _with_recipe_defaults(fields[name], value) for name, value in data.items()}
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def _with_recipe_defaults(f: dataclasses.Field, value: Any) -> Any:
    """A section given as a mapping keeps the defaults its owner chose for the keys it does not set.

    `optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, weight_decay=0.0))` is a recipe
    saying what its optimizer defaults are; a config that sets only `optim: {lr: 3e-4}` must still get that
    weight_decay 0.0, not OptimConfig's own 0.1. Only the keys where the owner's instance differs from the
    class's plain defaults are filled in, so a section keeps meaning what its class documents otherwise."""
    if not isinstance(value, dict) or f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    if not dataclasses.is_dataclass(default) or isinstance(default, type):
        return value
    try:
        plain = type(default)()
    except TypeError:  # required fields: no plain defaults to compare with
        return value
    chosen = {g.name: getattr(default, g.name) for g in dataclasses.fields(default)
              if g.init and g.name not in value and getattr(default, g.name) != getattr(plain, g.name)}
    chosen = {k: to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in chosen.items()}
    return {**chosen, **value}


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain JSON/YAML-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`--a.b=value` or `a.b=value` -> (["a", "b"], value), the value parsed as YAML (so 3, 1e-3, true, [1,2])."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override {text!r}: expected --key=value")
    key, raw = body.split("=", 1)
    key = key.replace("-", "_")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted `key=value` override in a nested dict (a copy)."""
    data = json.loads(json.dumps(data))
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def decode_utf8(data: bytes, where: str, error: type[Exception] = ConfigError, fix: str = "save it as UTF-8",
                first_line: int = 1) -> str:
    """Bytes -> text; bytes that are not UTF-8 are one `error` naming `where`, the line and the column
    (lines counted from `first_line`: the number of the first line of `data` in its file or stream)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + first_line
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise error(f"{where}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column}); {fix}") from None


def read_text(path: str | Path, error: type[Exception] = ConfigError, what: str = "file") -> str:
    """A UTF-8 text file; a missing/unreadable file or invalid UTF-8 is one `error` naming the file (and line)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a {what}") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({(e.strerror or str(e)).lower()})") from None
    return decode_utf8(data, str(path), error)


def json_error(e: json.JSONDecodeError) -> str:
    """A JSONDecodeError as words: "Expecting value at column 9", "Unterminated string starting at column 5"."""
    return f"{e.msg} column {e.colno}" if e.msg.endswith(" at") else f"{e.msg} at column {e.colno}"


def read_json(path: str | Path, error: type[ValueError] = ConfigError, missing: str = "not found") -> Any:
    """Parse a JSON file; a missing file, invalid UTF-8 or a syntax error is one `error` naming the file (and line)."""
    path = Path(path)
    if not path.exists():
        raise error(f"{path}: {missing}")
    try:
        return json.loads(read_text(path, error))
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: invalid JSON ({json_error(e)})") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a parse error, invalid UTF-8 or a non-mapping names the file (and line, where known)."""
    path = Path(path)
    text = read_text(path, ConfigError, "config file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def from_sources(cls: type[T], data: dict[str, Any], *, path: str | Path | None = None,
                 file_data: dict[str, Any] | None = None, flags: dict[str, str] | None = None) -> T:
    """from_dict(cls, data), where `data` merges a YAML file (`file_data`, read from `path`) with values given on
    the command line (`flags`: dotted key -> how the user wrote it, e.g. "--train.steps=abc" or "--input").

    An error is reported where its value came from: the command-line flag that set the key, else the file.
    """
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(_blame(e, cls, path, file_data, flags or {})) from None


def _blame(error: ConfigError, cls: type, path: str | Path | None, file_data: dict[str, Any] | None,
           flags: dict[str, str]) -> str:
    message, key = str(error), getattr(error, "key", None)
    if key is not None:
        for flag_key, label in flags.items():
            if key == flag_key or key.startswith(flag_key + ".") or key.startswith(flag_key + "[") \
                    or flag_key.startswith(key + "."):
                if message.startswith(f"{key}: "):
                    message = message[len(key) + 2:]
                return f"{label} (command line): {message}"
        return f"{path}: {message}" if path is not None else message
    # No single key (a check across fields, e.g. decay_steps <= warmup_steps): the file alone, or the flags?
    if path is None or not flags:
        return f"{path}: {message}" if path is not None else message
    try:
        from_dict(cls, file_data or {})
    except ConfigError:
        return f"{path}: {message}"
    return f"{message} (with the command-line options {' '.join(flags.values())})"


def override_flags(overrides: list[str]) -> dict[str, str]:
    """`--a.b=value` overrides -> {"a.b": "--a.b=value"}, for `from_sources`."""
    return {".".join(parse_override(text)[0]): text for text in overrides}


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> T:
    """YAML file (optional) + dotted overrides -> dataclass `cls`; an error names the file and key, or the
    command-line override it came from."""
    file_data = dict(base or {})
    if path is not None:
        file_data.update(load_yaml(path))
    data = apply_overrides(file_data, overrides or [])
    return from_sources(cls, data, path=path, file_data=file_data, flags=override_flags(overrides or []))
