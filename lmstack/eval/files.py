"""Reading evaluation data: plain, gzip or bzip2 files (told apart by their magic bytes, not their names),
JSONL and CSV with `file:line` in every error.

The package ships no benchmark data: every task reads the user's local copy in its public format.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmstack.errors import DataError, InputFileError

_GZIP, _BZIP2 = b"\x1f\x8b", b"BZh"


def open_text(path: str | Path) -> io.TextIOBase:
    """Open a text file for reading, decompressing gzip or bzip2 by the file's first bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(3)
        if magic[:2] == _GZIP:
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
        if magic == _BZIP2:
            return io.TextIOWrapper(bz2.open(path, "rb"), encoding="utf-8", newline="")
        return open(path, encoding="utf-8", newline="")
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a directory; expected a data file") from None
    except OSError as e:
        raise InputFileError(f"{path}: cannot read ({e.strerror or e})") from None


def read_text(path: str | Path) -> str:
    """The whole (possibly compressed) file as text; invalid UTF-8 is an error naming the file."""
    try:
        with open_text(path) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except (OSError, EOFError) as e:  # a truncated .gz / .bz2
        raise DataError(f"{path}: cannot decompress ({e})") from None


def read_lines(path: str | Path) -> list[str]:
    """Lines without their line endings (\\n, \\r\\n)."""
    return read_text(path).splitlines()


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is a DataError at file:line."""
    for number, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def read_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """JSONL, or a JSON file holding a list of objects (line numbers are then item indices + 1)."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        for i, item in enumerate(items, 1):
            if not isinstance(item, dict):
                raise DataError(f"{path}: item {i} is not a JSON object")
            yield i, item
        return
    yield from read_jsonl(path)


def read_csv(path: str | Path, header: bool = False) -> Iterator[tuple[int, list[str] | dict[str, str]]]:
    """(line number, row) for each CSV row: a list, or a dict by the first row's names when `header`."""
    text = read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    names: list[str] | None = None
    try:
        for row in reader:
            if not row or not any(cell.strip() for cell in row):
                continue
            if header and names is None:
                names = row
                continue
            if names is not None:
                if len(row) != len(names):
                    raise DataError(f"{path}:{reader.line_num}: {len(row)} fields, but the header has {len(names)}")
                yield reader.line_num, dict(zip(names, row))
            else:
                yield reader.line_num, row
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def require(record: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """record[key], checked to be of `kind`; a DataError naming file:line and the key otherwise."""
    if key not in record:
        raise DataError(f"{where}: missing field {key!r} (fields: {', '.join(sorted(record)) or 'none'})")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {key!r} should be {names}, got {type(value).__name__}")
    return value


__all__ = ["open_text", "read_csv", "read_jsonl", "read_lines", "read_records", "read_text", "require"]
