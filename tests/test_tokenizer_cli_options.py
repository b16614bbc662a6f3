"""`lmstack tokenizer` on a new user's mistakes: no training text, text that is not UTF-8 (argument or
stdin), and the shared conventions (--out, choices in --help, --print-config)."""

from __future__ import annotations

import io
import json
import sys

import pytest
import yaml

from lmstack.cli import main
from lmstack.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "a.txt").write_text("hello world, the cat sat on the mat. " * 50)
    assert main(["tokenizer", "train", "--input", str(root / "a.txt"), "--vocab-size", "280",
                 "--out", str(root / "tok")]) == 0
    return root / "tok"


@pytest.mark.parametrize("content, words", [
    ('{"body": "hello"}\n{"body": "world"}\n', "no training text: 2 records of {path} have no string field 'text'; "
                                               "set --text-field"),
    ("", "no training text: {path} holds 0 documents"),
])
def test_inputs_that_yield_no_text_are_an_error_and_write_nothing(tmp_path, capsys, content, words):
    path = tmp_path / ("in.jsonl" if content else "empty.txt")
    path.write_text(content)
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(path), "--vocab-size", "280", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert words.format(path=path) in err[-1] and err[-1].startswith("lmstack tokenizer: error:"), err
    assert not out.exists()


def test_text_that_is_not_utf8_is_one_line_naming_where(tok_dir, capsys, monkeypatch):
    bad_argument = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    assert main(["tokenizer", "encode", "--tokenizer", str(tok_dir), "ok", bad_argument]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lmstack tokenizer: error: text argument 2:1: not valid UTF-8 (byte 0xe9 at column 4); pass "
                   "UTF-8 text (is the terminal's locale UTF-8?)"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"fine\nline \xff two\n")))
    assert main(["tokenizer", "encode", "--tokenizer", str(tok_dir), "-"]) == 1
    assert capsys.readouterr().err.strip() == ("lmstack tokenizer: error: <stdin>:2: not valid UTF-8 (byte 0xff at "
                                               "column 6); send UTF-8 text")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("naïve\n".encode())))
    assert main(["tokenizer", "encode", "--tokenizer", str(tok_dir), "--json", "-"]) == 0
    ids = json.loads(capsys.readouterr().out)["ids"]
    assert load_tokenizer(tok_dir).decode(ids) == "naïve\n"


def test_out_print_config_and_choices(tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("hello world " * 30)
    yaml_file = tmp_path / "tok.yaml"
    yaml_file.write_text("kind: char\n")
    assert main(["tokenizer", "train", "--config", str(yaml_file), "--input", str(text), "--output", str(tmp_path / "t"),
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["kind"] == "char" and printed["inputs"] == [str(text)] and printed["output"] == str(tmp_path / "t")
    assert not (tmp_path / "t").exists()
    with pytest.raises(SystemExit):
        main(["tokenizer", "train", "--help"])
    help_text = capsys.readouterr().out
    assert "{bpe,wordpiece,unigram,char}" in help_text and "{auto,text,jsonl,parquet}" in help_text
    assert "--out DIR" in help_text and "--output" not in help_text
    yaml_file.write_text("vocab_size: lots\n")
    assert main(["tokenizer", "train", "--config", str(yaml_file), "--input", str(text), "--out", "t"]) == 1
    assert f"{yaml_file}: vocab_size: expected an integer or null, got 'lots'" in capsys.readouterr().err
