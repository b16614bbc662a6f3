"""`lmstack eval` end to end: run directories, --compare, and one-line errors for bad input."""

from __future__ import annotations

import bz2
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


def test_an_adapter_evaluates_as_its_merged_model(tiny_model_dir, shared_data, tmp_path, capsys):
    """--adapter DIR scores the base with a (non-zero) LoRA applied: the same perplexity as `lmstack merge`'s
    output, and not the base's; an empty directory is no adapter: one line."""
    import torch

    import lmstack
    from lmstack.adapters import LoraConfig, apply_lora, save_adapter

    model = lmstack.load_model(tiny_model_dir)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    save_adapter(model, tmp_path / "adapter")
    text = tmp_path / "text.txt"  # one short document: the whole file would be ~5,000 windows of 64
    text.write_text((shared_data / "tinyshakespeare" / "input.txt").read_text()[:3000])
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0

    def perplexity(directory, *adapter):
        out = tmp_path / f"run-{directory.name}-{len(adapter)}"
        assert main(["eval", "--model", str(directory), *adapter, "--task", "perplexity", "--data",
                     str(text), "--max-length", "64",
                     "--out", str(out)]) == 0
        metrics = json.loads((out / "results.json").read_text())["metrics"]
        return next(m["value"] for m in metrics if m["metric"] == "token_perplexity")

    adapted = perplexity(tiny_model_dir, "--adapter", str(tmp_path / "adapter"))
    assert adapted == pytest.approx(perplexity(tmp_path / "merged"), rel=1e-4)
    assert abs(adapted - perplexity(tiny_model_dir)) > 1e-3 * adapted
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "empty"), "--task",
                 "perplexity", "--data", str(text)]) == 1
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
