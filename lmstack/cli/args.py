"""What every verb's command line shares: one spelling per concept, one wording per mistake.

- `--out DIR` names every verb's output (older spellings such as `--output`, `-o` still work, unlisted);
- numbers are checked by argparse with the schema's wording ("expected a positive integer, got '0'");
- `--print-config` prints the effective config of a config-driven verb as YAML and exits;
- text from the command line or standard input that is not UTF-8 is one error naming where it came from.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import yaml

from lmstack.errors import InputFileError
from lmstack.schema import decode_utf8, to_dict


def add_out(parser: argparse.ArgumentParser | Any, *old_spellings: str, dest: str = "out", **kwargs: Any) -> None:
    """`--out` (listed) plus older spellings of the same option (accepted, not listed in --help)."""
    parser.add_argument("--out", dest=dest, metavar=kwargs.pop("metavar", "DIR"), **kwargs)
    if old_spellings:
        kwargs.pop("required", None)
        parser.add_argument(*old_spellings, dest=dest, help=argparse.SUPPRESS,
                            **{k: v for k, v in kwargs.items() if k in ("type", "default")})


def _number(kind: type, text: str, minimum: float | None, strict: bool) -> Any:
    noun = "an integer" if kind is int else "a number"
    if minimum is not None:
        noun = f"a positive {noun.split()[-1]}" if strict and minimum == 0 else f"{noun} >= {minimum:g}"
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}")
    return value


def integer(text: str) -> int:
    return _number(int, text, None, False)


def positive_int(text: str) -> int:
    return _number(int, text, 0, True)


def non_negative_int(text: str) -> int:
    return _number(int, text, 0, False)


def number(text: str) -> float:
    return _number(float, text, None, False)


def positive_number(text: str) -> float:
    return _number(float, text, 0, True)


PRINT_CONFIG_HELP = "print the effective config (defaults, YAML file and options merged) as YAML and exit"


def print_config(config: Any, header: str | None = None) -> int:
    """Print a dataclass config (or a dict) as YAML, keys in field order; returns the exit code 0."""
    data = to_dict(config) if not isinstance(config, dict) else config
    if header:
        print("\n".join(f"# {line}" for line in header.splitlines()))
    print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")
    return 0


def text_arg(text: str, where: str) -> str:
    """A command-line string that must be UTF-8 text (a prompt, text to encode).

    Python hands undecodable argv bytes over as lone surrogates (PEP 383); they are refused here by name
    instead of failing deep inside a tokenizer.
    """
    if any("\udc80" <= ch <= "\udcff" for ch in text):
        return decode_utf8(os.fsencode(text), where, InputFileError,
                           "pass UTF-8 text (is the terminal's locale UTF-8?)")
    return text


def read_stdin(where: str = "<stdin>") -> str:
    """All of standard input as UTF-8 text; invalid bytes are one error naming the line."""
    return decode_utf8(sys.stdin.buffer.read(), where, InputFileError, "send UTF-8 text")
