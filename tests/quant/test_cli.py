"""`lmstack quantize`, `lmstack info` and `lmstack generate` on a quantized directory, end to end in-process."""

from __future__ import annotations

import json

import pytest
import torch

import lmstack
from lmstack.cli import main as cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import pydoc_data.topics

    from lmstack.tokenizer import train_tokenizer

    topics = list(pydoc_data.topics.topics.values())
    tokenizer = train_tokenizer(iter(topics[:30]), "bpe", 384)
    torch.manual_seed(0)
    cfg = lmstack.ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, intermediate_size=128, max_seq_len=64,
                              eos_token_id=tokenizer.eos_token_id)
    root = tmp_path_factory.mktemp("cli")
    lmstack.save_model(lmstack.Transformer(cfg), root / "model", extra_files=tokenizer.files())
    (root / "calib.txt").write_text("\n\n".join(topics[30:60]))
    (root / "held_out.txt").write_text("\n\n".join(topics[60:90]))
    return root


@pytest.mark.parametrize("method,extra", [("gptq", ["--bits", "4", "--group-size", "32", "--act-order"]),
                                          ("qat", ["--bits", "4", "--group-size", "32", "--qat-steps", "3"]),
                                          ("nf4", [])])
def test_quantize_then_info_then_generate(model_dir, tmp_path, capsys, method, extra):
    out = tmp_path / f"q-{method}"
    assert cli(["quantize", "--model", str(model_dir / "model"), "--method", method, "--out", str(out),
                "--calib", str(model_dir / "calib.txt"), "--calib-samples", "8", "--calib-seq-len", "32",
                "--eval", str(model_dir / "held_out.txt"), "--json", *extra]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["method"] == method and report["layers"] == 14
    assert 0 < report["bytes_per_parameter"] < 4 and report["quantized_bytes_per_parameter"] < 0.7
    assert report["perplexity_after"] > 0 and report["perplexity_before"] > 0
    assert (out / "tokenizer.json").exists()

    assert cli(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantized"]["method"] == method
    assert info["quantized"]["bytes_per_parameter"] == pytest.approx(report["bytes_per_parameter"], rel=1e-3)

    assert cli(["generate", "--model", str(out), "--prompt", "The", "--max-new-tokens", "5", "--jsonl"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(line["token_ids"]) == 5


def test_quantize_errors(model_dir, tmp_path, capsys):
    assert cli(["quantize", "--model", str(model_dir / "model"), "--method", "gptq", "--out", str(tmp_path / "x"),
                "--calib", str(tmp_path / "missing")]) == 1
    assert "no such file or directory" in capsys.readouterr().err
    assert cli(["quantize", "--model", str(model_dir / "model"), "--method", "rtn", "--group-size", "48",
                "--out", str(tmp_path / "x")]) == 1
    assert "input size 64 is not a multiple of the group size 48" in capsys.readouterr().err
