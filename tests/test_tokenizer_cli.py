"""`lmstack tokenizer train|encode|decode|info` through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmstack.cli import main as lmstack
from lmstack.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def inputs(shared_data: Path, tmp_path_factory) -> tuple[Path, Path]:
    """A directory of two Gutenberg books and a JSONL file of GSM8K questions with one malformed line."""
    books = tmp_path_factory.mktemp("books")
    for name in ("blake-poems.txt", "blake-songs.txt"):
        (books / "nested").mkdir(exist_ok=True)
        (books / "nested" / name).write_bytes((shared_data / "gutenberg_nltk" / name).read_bytes())
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:300]
    jsonl = tmp_path_factory.mktemp("jsonl") / "questions.jsonl"
    jsonl.write_text("\n".join([*lines[:10], '{"question": broken', *lines[10:]]) + "\n", encoding="utf-8")
    return books, jsonl


def test_train_from_directory_and_jsonl_then_encode(inputs, tmp_path, capsys):
    books, jsonl = inputs
    out = tmp_path / "tok"
    assert lmstack(["tokenizer", "train", "--kind", "bpe", "--vocab-size", "700", "--input", str(books), str(jsonl),
                    "--text-field", "question", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert "vocab 700" in captured.out and "302 documents" in captured.out and "1 records skipped" in captured.out
    assert "questions.jsonl:11" in captured.err  # the malformed line is reported with file:line
    tokenizer = load_tokenizer(out)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    # a GSM8K question must be in the vocabulary's domain: its numbers and words were trained on
    question = json.loads(jsonl.read_text(encoding="utf-8").splitlines()[0])["question"]
    assert tokenizer.encode(question) == hf(question, add_special_tokens=False)["input_ids"]

    assert lmstack(["tokenizer", "encode", "--tokenizer", str(out), "--json", question]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["ids"] == tokenizer.encode(question) and printed["tokens"] == tokenizer.tokenize(question)
    assert lmstack(["tokenizer", "encode", "--tokenizer", str(out), "--special", "Tyger tyger"]) == 0
    text = capsys.readouterr().out
    ids = tokenizer.encode("Tyger tyger", add_special_tokens=True)
    tokens = tokenizer.tokenize("Tyger tyger", add_special_tokens=True)
    pieces = " ".join(json.dumps(t, ensure_ascii=False) for t in tokens)
    assert f"ids:    {' '.join(map(str, ids))}\npieces: {pieces}\n" in text and pieces.startswith('"<|bos|>" "T')
    assert lmstack(["tokenizer", "decode", "--tokenizer", str(out), *map(str, ids)]) == 0
    assert capsys.readouterr().out == "<|bos|>Tyger tyger\n"
    assert lmstack(["tokenizer", "info", str(out)]) == 0
    assert tokenizer.sha256() in capsys.readouterr().out


def test_strict_mode_stops_at_the_malformed_line(inputs, tmp_path, capsys):
    _, jsonl = inputs
    code = lmstack(["tokenizer", "train", "--kind", "wordpiece", "--vocab-size", "500", "--input", str(jsonl),
                    "--text-field", "question", "--strict", "--output", str(tmp_path / "tok")])
    assert code == 1
    assert "questions.jsonl:11" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()  # nothing half-written


def test_special_tokens_chat_template_and_yaml_config(inputs, tmp_path, capsys):
    books, _ = inputs
    config = tmp_path / "tok.yaml"
    config.write_text(f"kind: unigram\nvocab_size: 900\ninputs: [{books}]\nchat_template: llama3\n", encoding="utf-8")
    out = tmp_path / "tok"
    assert lmstack(["tokenizer", "train", "--config", str(config), "--vocab-size", "500", "--output", str(out),
                    "--special-tokens", "bos=<|begin_of_text|>", "pad=", "<|tool|>"]) == 0
    tokenizer = load_tokenizer(out)
    assert tokenizer.vocab_size == 500  # the flag overrides the YAML value
    assert tokenizer.bos_token == "<|begin_of_text|>" and tokenizer.pad_token is None
    assert {"<|tool|>", "<|eot_id|>", "<|start_header_id|>"} <= set(tokenizer.special_tokens.extra)
    messages = [{"role": "user", "content": "Tyger?"}, {"role": "assistant", "content": "Burning bright."}]
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False)
    assert tokenizer.apply_chat_template(messages).startswith("<|begin_of_text|><|start_header_id|>user")


def test_char_kind_keeps_every_character(shared_data, tmp_path, capsys):
    source = shared_data / "tinyshakespeare" / "input.txt"
    out = tmp_path / "tok"
    assert lmstack(["tokenizer", "train", "--kind", "char", "--input", str(source), "--output", str(out)]) == 0
    tokenizer = load_tokenizer(out)
    text = source.read_text(encoding="utf-8")
    assert tokenizer.vocab_size == len(set(text)) + 4 == 69  # 65 characters (data README) + 4 specials
    assert tokenizer.decode(tokenizer.encode(text[:2000])) == text[:2000]


@pytest.mark.parametrize("argv, message", [
    (["train", "--vocab-size", "100", "--input", "BOOK", "--output", "o"], "too small for byte-level BPE"),
    (["train", "--input", "/no/such/dir", "--output", "o"], "/no/such/dir: no such file or directory"),
    (["train", "--output", "o"], "no training text"),
    (["train", "--input", "BOOK", "--output", "o", "--special-tokens", "bso=<s>"], "unknown role 'bso'"),
    (["encode", "--tokenizer", "/no/such/tok", "hi"], "/no/such/tok: no such tokenizer directory"),
])
def test_bad_input_gives_one_clear_line(shared_data, tmp_path, capsys, argv, message):
    book = str(shared_data / "gutenberg_nltk" / "blake-poems.txt")
    argv = [book if a == "BOOK" else str(tmp_path / a) if a == "o" else a for a in argv]
    assert lmstack(["tokenizer", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_an_unknown_kind_is_a_usage_error_listing_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lmstack(["tokenizer", "train", "--kind", "sentencepiece", "--input", "x", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'sentencepiece' (choose from 'bpe', 'wordpiece', 'unigram', 'char')" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_train_on_builtin_python_docs(tmp_path, capsys):
    out = tmp_path / "tok"
    assert lmstack(["tokenizer", "train", "--corpus", "builtin:python-docs", "--vocab-size", "4000",
                    "--output", str(out)]) == 0
    tokenizer = load_tokenizer(out)
    assert tokenizer.vocab_size == 4000
    assert len(tokenizer.encode("def __init__(self):")) <= 6  # trained on Python: common idioms are few tokens
