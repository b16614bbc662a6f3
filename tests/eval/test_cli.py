"""`lmstack eval` end to end: run directories, --compare, and one-line errors for bad input."""

from __future__ import annotations

import bz2
import inspect
import json

import pytest

from lmstack.cli import main


def test_eval_writes_a_run_and_compares_two(tiny_model_dir, hellaswag_lines, tmp_path, capsys):
    data = tmp_path / "hellaswag_60.txt.bz2"  # the first 10 tasks, in the compressed text form
    data.write_bytes(bz2.compress(("\n".join(hellaswag_lines[:60]) + "\n").encode()))
    for name, shots in (("zero", 0), ("one", 1)):
        assert main(["eval", "--model", str(tiny_model_dir), "--task", "hellaswag", "--data", str(data),
                     "--limit", "6", "--shots", str(shots), "--batch-size", "4", "--out", str(tmp_path / name)]) == 0
    table = capsys.readouterr().out
    assert "| hellaswag | acc_norm |" in table
    record = json.loads((tmp_path / "one" / "results.json").read_text())
    assert record["task"] == "hellaswag" and record["settings"]["shots"] == 1 and record["info"]["items"] == 6
    assert {m["metric"] for m in record["metrics"]} == {"acc", "acc_norm"}
    assert all(m["n"] == 6 and m["stderr"] is not None for m in record["metrics"])
    samples = [json.loads(line) for line in (tmp_path / "one" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and len(samples[0]["loglikelihoods"]) == 4
    assert (tmp_path / "one" / "results.md").read_text().startswith("## hellaswag")
    assert main(["eval", "--compare", str(tmp_path / "zero"), str(tmp_path / "one")]) == 0
    assert "| hellaswag | acc | " in capsys.readouterr().out


def test_mmlu_run_has_subjects_and_a_plot(tiny_model_dir, tmp_path, capsys):
    for subject in ("anatomy", "virology"):
        for split in ("test", "dev"):
            (tmp_path / "data" / split).mkdir(parents=True, exist_ok=True)
            rows = [f"What is {subject} {i}?,w{i},x{i},y{i},z{i},{'ABCD'[i % 4]}" for i in range(5)]
            (tmp_path / "data" / split / f"{subject}_{split}.csv").write_text("\n".join(rows) + "\n")
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "mmlu", "--data", str(tmp_path / "data"),
                 "--shots", "2", "--out", str(tmp_path / "run"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record["subjects"]) == {"anatomy", "virology"} and record["subjects"]["anatomy"]["n"] == 5
    assert (tmp_path / "run" / "subjects.png").stat().st_size > 1000


def test_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": {"stem": "x", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "C"}\n')
    cases = [
        (["--task", "arc", "--data", str(bad)], f"{bad}:1: answerKey 'C' is not one of the labels"),
        (["--task", "hellaswag"], "needs --data PATH"),
        (["--task", "nope", "--data", str(bad)], "--task 'nope': choose one of"),
        (["--task", "arc", "--data", str(tmp_path / "missing.jsonl")], "no such file"),
    ]
    for args, message in cases:
        assert main(["eval", "--model", str(tiny_model_dir), *args]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_adapter_flag_reaches_load_model(tiny_model_dir, shared_data, tmp_path, capsys):
    from lmstack.interop.hf import load_model

    args = ["eval", "--model", str(tiny_model_dir), "--adapter", str(tmp_path), "--task", "perplexity",
            "--data", str(shared_data / "tinyshakespeare" / "input.txt"), "--max-length", "64", "--limit", "1"]
    if "adapter" not in inspect.signature(load_model).parameters:
        assert main(args) == 1
        assert "takes no adapter yet" in capsys.readouterr().err
    else:  # an empty directory is no adapter: load_model's own error, one line
        assert main(args) == 1
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("strict", [False, True])
def test_prompts_longer_than_the_context(tiny_model_dir, tmp_path, capsys, strict):
    long_query = " ".join(["word"] * 400)
    (tmp_path / "long.jsonl").write_text(json.dumps({"q": long_query, "c": ["yes", "no"], "a": 0}) + "\n")
    (tmp_path / "t.yaml").write_text("name: long\ndata: long.jsonl\nprompt: '{{q}}'\nchoices: c\nanswer: a\n")
    code = main(["eval", "--model", str(tiny_model_dir), "--task", str(tmp_path / "t.yaml"), "--json"]
                + (["--strict"] if strict else []))
    out, err = capsys.readouterr()
    if strict:
        assert code == 1 and "exceed the model's context" in err
    else:
        assert code == 0 and json.loads(out)["info"]["truncated"] == 1
