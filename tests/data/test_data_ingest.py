"""Readers: text units, JSONL fields, Parquet columns, gzip by content, and each kind of bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmstack.data.ingest import IngestStats, decode_utf8, expand_inputs, read_documents
from lmstack.errors import DataError


def _read(paths, **kw) -> tuple[list[str], IngestStats]:
    stats = IngestStats()
    return [d.text for d in read_documents([Path(p) for p in paths], stats, **kw)], stats


def test_text_units(tmp_path: Path) -> None:
    f = tmp_path / "a.md"
    f.write_text("one\ntwo\n\n\nthree\n  \nfour\n", encoding="utf-8")
    assert _read([f])[0] == ["one\ntwo\n\n\nthree\n  \nfour\n"]
    assert _read([f], text_unit="paragraph")[0] == ["one\ntwo", "three", "four"]
    lines, stats = _read([f], text_unit="line")
    assert lines == ["one", "two", "three", "four"]
    assert stats.empty_documents == 3 and stats.documents == 4


def test_gzip_is_detected_by_content_and_suffix_names_the_format(tmp_path: Path) -> None:
    rows = [{"text": "alpha"}, {"text": "beta", "x": 1}]
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    # a gzip file whose name does not say so is still gunzipped (the content decides)
    (tmp_path / "plain.txt").write_bytes(gzip.compress("hello gzip".encode()))
    assert _read([tmp_path / "d.jsonl.gz"])[0] == ["alpha", "beta"]
    assert _read([tmp_path / "plain.txt"])[0] == ["hello gzip"]


def test_jsonl_nested_field_malformed_and_missing(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"meta": {"body": "first"}}\n{not json\n\n{"other": 1}\n{"meta": {"body": 5}}\n'
                 '{"meta": {"body": "last"}}\n', encoding="utf-8")
    texts, stats = _read([f], text_field="meta.body")
    assert texts == ["first", "last"]
    assert (stats.malformed_lines, stats.missing_field, stats.non_string_field) == (1, 1, 1)
    assert any(w.startswith(f"{f}:2: malformed JSON") for w in stats.warnings)
    assert any(w.startswith(f"{f}:4: no field 'meta.body'") for w in stats.warnings)
    with pytest.raises(DataError, match=rf"{f}:2: malformed JSON.*--strict"):
        _read([f], text_field="meta.body", strict=True)


def test_parquet_column_and_missing_column(tmp_path: Path) -> None:
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["a b c", None, "d e"], "id": [1, 2, 3]}), f, row_group_size=2)
    texts, stats = _read([f], text_field="content")
    assert texts == ["a b c", "d e"] and stats.missing_field == 1 and stats.records == 3
    with pytest.raises(DataError, match=r"no column 'text' \(columns: content, id\)"):
        _read([f])


def test_invalid_utf8_is_replaced_and_counted() -> None:
    stats = IngestStats()
    # \xff and \xfe are never valid; \xe2\x82 is a truncated 3-byte sequence: 4 bad bytes in 2 runs
    assert decode_utf8(b"ab\xff\xfecd \xe2\x82!", stats) == "ab\ufffdcd \ufffd!"
    assert stats.invalid_utf8_bytes == 4 and stats.documents_with_invalid_utf8 == 1
    assert decode_utf8("caf\u00e9".encode(), stats) == "caf\u00e9" and stats.invalid_utf8_bytes == 4


def test_expand_inputs_directory_glob_and_errors(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    for name in ("b.txt", "sub/a.md", "sub/deep/c.jsonl.gz", "sub/skip.bin"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in expand_inputs([tmp_path])] == [
        "b.txt", "sub/a.md", "sub/deep/c.jsonl.gz"]
    assert [p.name for p in expand_inputs([str(tmp_path / "**" / "*.md")])] == ["a.md"]
    with pytest.raises(DataError, match="no such file or directory"):
        expand_inputs([tmp_path / "missing.txt"])
    with pytest.raises(DataError, match="matches no files"):
        expand_inputs([str(tmp_path / "*.parquet")])
