"""`lmstack generate` and `lmstack chat` end to end on a tiny model directory with a tokenizer."""

from __future__ import annotations

import io
import json

import pytest

from lmstack.cli import main
from lmstack.generate import generate


def test_generate_prompt_prints_the_completion(tiny_model_dir, tiny, capsys):
    model, tokenizer = tiny
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "def main", "--max-new-tokens", "12"]) == 0
    expected = generate(model, tokenizer, "def main", max_new_tokens=12).texts[0]
    assert capsys.readouterr().out == expected + "\n"


def test_generate_prompts_file_writes_jsonl(tiny_model_dir, tiny, tmp_path):
    model, tokenizer = tiny
    prompts = tmp_path / "in.jsonl"
    messages = [{"role": "user", "content": "hi"}]
    prompts.write_text(json.dumps({"id": "a", "prompt": "import os"}) + "\n\n"
                       + json.dumps({"id": "b", "messages": messages}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompts-file", str(prompts), "--output", str(out),
                 "--max-new-tokens", "6", "--temperature", "0.9", "--seed", "5", "--top-k", "20", "--logprobs"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", "b"]
    # a plain prompt is encoded with the special tokens, a rendered chat without (the template writes its own)
    prompts = [tokenizer.encode("import os", add_special_tokens=True),
               tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))]
    expected = generate(model, tokenizer, prompts, max_new_tokens=6, temperature=0.9, seed=5, top_k=20)
    assert [r["token_ids"] for r in records] == expected.token_ids
    assert all(len(r["logprobs"]) == len(r["token_ids"]) for r in records)


def test_generate_beam_search_jsonl(tiny_model_dir, tiny, capsys):
    model, tokenizer = tiny
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "x = 1", "--jsonl", "--num-beams", "3",
                 "--num-return-sequences", "2", "--length-penalty", "0.8", "--max-new-tokens", "5"]) == 0
    record = json.loads(capsys.readouterr().out)
    expected = generate(model, tokenizer, "x = 1", num_beams=3, num_return_sequences=2, length_penalty=0.8,
                        max_new_tokens=5)
    assert record["token_ids"] == expected.token_ids[0] and len(record["beams"]) == 2


def test_generate_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    assert main(["generate", "--model", str(tiny_model_dir), "--prompts-file", str(bad)]) == 1
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().err
    bad.write_text('{"text": "no prompt key"}\n')
    assert main(["generate", "--model", str(tiny_model_dir), "--prompts-file", str(bad)]) == 1
    assert f'{bad}:1: give exactly one of "prompt"' in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "a", "--top-k", "-2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "top_k must be >= 0" in err
    # an empty prompt starts from the tokenizer's BOS; without special tokens it holds no token at all
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "", "--no-special-tokens"]) == 1
    assert "prompt 0 is empty" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "a"]) == 1
    assert "no such model directory" in capsys.readouterr().err


def test_chat_keeps_history_and_handles_commands(tiny_model_dir, tiny, monkeypatch, capsys):
    model, tokenizer = tiny
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/system Be brief.\nagain\n/reset\nhello\n/bogus\n"))
    assert main(["chat", "--model", str(tiny_model_dir), "--temperature", "0", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    eos = [tokenizer.eos_token_id, tokenizer.token_to_id("<|im_end|>")]

    def reply(messages):
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))  # no BOS added
        return generate(model, tokenizer, [ids], max_new_tokens=8, eos_token_ids=eos).texts[0]

    first = reply([{"role": "user", "content": "hello"}])
    # the second turn sees the system message and the whole history
    second = reply([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                    {"role": "assistant", "content": first}, {"role": "user", "content": "again"}])
    # after /reset only the system message remains
    third = reply([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}])
    expected = f"{first}\n[system message set]\n{second}\n[conversation cleared]\n{third}\n[unknown command /bogus"
    assert out.startswith(expected)


@pytest.mark.slow
def test_generate_compile_matches_eager_and_stats_say_when_it_compiled(tiny_model_dir, tiny, capsys):
    model, tokenizer = tiny
    prompts = ["def main", "import os", "x = 1", "class A"]
    argv = ["generate", "--model", str(tiny_model_dir), "--jsonl", "--stats", "--batch-size", "2",
            "--max-new-tokens", "8", "--compile"] + [arg for p in prompts for arg in ("--prompt", p)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["token_ids"] for r in records] == generate(model, tokenizer, prompts, max_new_tokens=8).token_ids
    first, second = captured.err.strip().splitlines()  # one stats line per batch of 2
    assert "includes compiling" in first and "includes compiling" not in second
