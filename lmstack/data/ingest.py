"""Read documents from text/markdown, JSONL and Parquet files (each optionally gzipped), streaming.

Every reader is a generator that holds at most one document (a text file in `file` mode, one JSONL
line, one Parquet record batch) in memory, so a corpus larger than RAM streams through.

Bad input never stops the run silently and never crashes deep inside a parser:
- invalid UTF-8 bytes are replaced with U+FFFD and counted (`IngestStats.invalid_utf8_bytes`);
- a malformed JSONL line or a record without the text field is skipped, counted and reported with
  its `file:line`, or raises `DataError` naming `file:line` when `strict=True`;
- a Parquet file without the column raises `DataError` naming the file and its columns.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

from lmstack.errors import DataError
from lmstack.schema import json_error

Format = Literal["auto", "text", "jsonl", "parquet"]
TextUnit = Literal["file", "paragraph", "line"]

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
KNOWN_SUFFIXES = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
GZIP_MAGIC = b"\x1f\x8b"
_SURROGATES = re.compile("[\udc80-\udcff]+")  # invalid bytes, as decoded by 'surrogateescape'
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
MAX_WARNINGS = 20  # per kind: enough to locate a problem without flooding the terminal


@dataclass
class Document:
    """One document: its text and where it came from (`path` or `path:line`)."""

    text: str
    source: str


@dataclass
class IngestStats:
    """What the readers saw: counts for the data report, plus the first few warnings verbatim."""

    files: int = 0
    records: int = 0  # JSONL lines / Parquet rows / text units read, before any skipping
    documents: int = 0
    bytes_read: int = 0
    invalid_utf8_bytes: int = 0
    documents_with_invalid_utf8: int = 0
    malformed_lines: int = 0
    missing_field: int = 0
    non_string_field: int = 0
    empty_documents: int = 0
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(message)
            print(f"lmstack data: warning: {message}", file=sys.stderr)


def decode_utf8(raw: bytes, stats: IngestStats) -> str:
    """UTF-8 bytes -> str; each invalid byte becomes U+FFFD (a run of them one U+FFFD) and is counted."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    text = raw.decode("utf-8", errors="surrogateescape")
    bad = sum(len(m.group()) for m in _SURROGATES.finditer(text))
    stats.invalid_utf8_bytes += bad
    stats.documents_with_invalid_utf8 += 1
    return _SURROGATES.sub("\ufffd", text)


def expand_inputs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files named directly, files under directories (recursive, known suffixes only) and glob matches.

    The order is deterministic (each argument in turn, sorted within a directory or glob), so a
    rerun sees the same document sequence, which resume and the document split rely on.
    """
    files: list[Path] = []
    for arg in paths:
        text = str(arg)
        if any(ch in text for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"{text}: the pattern matches no files")
            files.extend(matches)
            continue
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _content_suffix(p) in KNOWN_SUFFIXES)
            if not found:
                raise DataError(f"{path}: directory holds no .txt/.md/.jsonl/.parquet files (or their .gz)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise DataError(f"{path}: not a regular file or directory")
        else:
            raise DataError(f"{path}: no such file or directory")
    return files


def _content_suffix(path: Path) -> str:
    """The suffix that names the content: `a.jsonl.gz` -> `.jsonl`."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def detect_format(path: Path, requested: Format) -> Literal["text", "jsonl", "parquet"]:
    """The explicit `--format` wins; `auto` uses the content suffix and falls back to text."""
    if requested != "auto":
        return requested
    suffix = _content_suffix(path)
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def open_maybe_gzip(path: Path) -> BinaryIO:
    """Open for binary reading, transparently gunzipping when the file starts with the gzip magic bytes."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if f.read(2) == GZIP_MAGIC:
        f.close()
        return gzip.open(path, "rb")  # type: ignore[return-value]
    f.seek(0)
    return f


def read_text_file(path: Path, unit: TextUnit, stats: IngestStats) -> Iterator[Document]:
    """A text/markdown file as one document (`file`), one per blank-line paragraph, or one per line.

    `paragraph` and `line` stream the file; `file` holds the one document it yields.
    """
    with open_maybe_gzip(path) as f:
        if unit == "file":
            raw = _read_checked(f, path)
            stats.bytes_read += len(raw)
            stats.records += 1
            yield Document(decode_utf8(raw, stats), str(path))
            return
        buffer: list[bytes] = []
        start_line = 1
        for lineno, raw_line in enumerate(_lines_checked(f, path), start=1):
            stats.bytes_read += len(raw_line)
            if unit == "line":
                stats.records += 1
                yield Document(decode_utf8(raw_line.rstrip(b"\r\n"), stats), f"{path}:{lineno}")
            elif raw_line.strip():
                if not buffer:
                    start_line = lineno
                buffer.append(raw_line)
            elif buffer:
                stats.records += 1
                yield Document(_paragraph(buffer, stats), f"{path}:{start_line}")
                buffer = []
        if buffer:
            stats.records += 1
            yield Document(_paragraph(buffer, stats), f"{path}:{start_line}")


def _paragraph(lines: list[bytes], stats: IngestStats) -> str:
    # the last line's break terminates the paragraph; it is not part of its text
    return decode_utf8(b"".join(lines).rstrip(b"\r\n"), stats)


def read_jsonl(path: Path, text_field: str, strict: bool, stats: IngestStats) -> Iterator[Document]:
    """One document per JSON object line, taking `text_field` (dotted for nested: `meta.body`)."""
    keys = text_field.split(".")
    with open_maybe_gzip(path) as f:
        for lineno, raw_line in enumerate(_lines_checked(f, path), start=1):
            stats.bytes_read += len(raw_line)
            if not raw_line.strip():
                continue
            stats.records += 1
            where = f"{path}:{lineno}"
            try:
                record = json.loads(decode_utf8(raw_line, stats))
            except json.JSONDecodeError as e:
                _skip(stats, "malformed_lines", f"{where}: malformed JSON ({json_error(e)})", strict)
                continue
            value: object = record
            for key in keys:
                if not isinstance(value, dict) or key not in value:
                    value = None
                    break
                value = value[key]
            if value is None:
                found = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
                _skip(stats, "missing_field", f"{where}: no field {text_field!r} (found: {found})", strict)
                continue
            if not isinstance(value, str):
                _skip(stats, "non_string_field",
                      f"{where}: field {text_field!r} is {type(value).__name__}, not a string", strict)
                continue
            yield Document(value, where)


def read_parquet(path: Path, column: str, stats: IngestStats, batch_rows: int = 1024) -> Iterator[Document]:
    """One document per row of string column `column`, read one record batch at a time."""
    import pyarrow.parquet as pq

    with open_maybe_gzip(path) as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises ArrowInvalid and friends with a useful message
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        names = pf.schema_arrow.names
        if column not in names:
            raise DataError(f"{path}: no column {column!r} (columns: {', '.join(names)})")
        row = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[column]):
            for value in batch.column(0).to_pylist():
                row += 1
                stats.records += 1
                if value is None:
                    _skip(stats, "missing_field", f"{path}: row {row}: column {column!r} is null", False)
                    continue
                if isinstance(value, bytes):
                    value = decode_utf8(value, stats)
                if not isinstance(value, str):
                    raise DataError(f"{path}: column {column!r} holds {type(value).__name__}, not strings")
                stats.bytes_read += len(value.encode("utf-8"))
                yield Document(value, f"{path}:row {row}")


def read_documents(paths: Iterable[Path], stats: IngestStats, *, fmt: Format = "auto", text_field: str = "text",
                   text_unit: TextUnit = "file", strict: bool = False) -> Iterator[Document]:
    """All documents of all files in order; empty documents (after stripping) are counted and dropped."""
    for path in paths:
        stats.files += 1
        kind = detect_format(path, fmt)
        if kind == "jsonl":
            docs = read_jsonl(path, text_field, strict, stats)
        elif kind == "parquet":
            docs = read_parquet(path, text_field, stats)
        else:
            docs = read_text_file(path, text_unit, stats)
        for doc in docs:
            if not doc.text.strip():
                stats.empty_documents += 1
                continue
            stats.documents += 1
            yield doc


def _skip(stats: IngestStats, counter: str, message: str, strict: bool) -> None:
    if strict:
        raise DataError(message + " (--strict)")
    setattr(stats, counter, getattr(stats, counter) + 1)
    stats.warn(message + "; skipped")


def _read_checked(f: BinaryIO, path: Path) -> bytes:
    try:
        return f.read()
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz surfaces here
        raise DataError(f"{path}: read failed ({e})") from None


def _lines_checked(f: BinaryIO, path: Path) -> Iterator[bytes]:
    try:
        yield from f
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: read failed ({e})") from None
