"""A shortened quickstart end to end: real data pipeline, tokenizer, engine, generation and report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import lmstack
from lmstack.cli.quickstart import main


def _corpus(shared_data: Path, tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for book in ("blake-poems.txt", "shakespeare-macbeth.txt", "chesterton-brown.txt"):
        (corpus / book).write_bytes((shared_data / "gutenberg_nltk" / book).read_bytes())
    return corpus


def _val_losses(out: Path) -> list[float]:
    return [r["val_loss"] for r in map(json.loads, (out / "run/metrics.jsonl").read_text().splitlines())
            if r["kind"] == "eval"]


def test_quickstart_end_to_end_on_real_text(shared_data, tmp_path):
    import transformers

    out = tmp_path / "qs"
    args = ["--out", str(out), "--corpus", str(_corpus(shared_data, tmp_path)), "--preset", "llama-tiny",
            "--vocab-size", "600", "--seq-len", "64", "--batch-size", "8", "--steps", "60"]
    assert main(args) == 0
    report = (out / "report.md").read_text()
    assert "validation perplexity before / after" in report and "![loss curve](loss.png)" in report
    assert (out / "loss.png").stat().st_size > 1000
    assert "### `The return value of`" in report and "beam search (4)" in report
    assert "## Data" in report and "tokens out" in report

    # Perplexity fell during the run: below the untrained model's and falling across evaluations.
    plan = json.loads((out / "quickstart.json").read_text())
    losses = _val_losses(out)
    assert plan["steps"] == 60 and len(losses) >= 4
    assert losses[-1] < losses[0] - 0.5
    assert float(report.split("validation loss before / after | ")[1].split(" /")[0]) > losses[-1]

    # OUT is a Hugging Face model directory: lmstack and transformers load it and agree.
    model = lmstack.load_model(out).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert (model(ids) - reference(ids).logits).abs().max().item() < 1e-4
    assert transformers.AutoTokenizer.from_pretrained(out).vocab_size > 256

    # The command quickstart ends with chats: its default reply budget is fitted to the model's context.
    chat = subprocess.run([sys.executable, "-m", "lmstack", "chat", "--model", str(out)], input="hi\nhello again\n",
                          capture_output=True, text=True, timeout=600)
    assert chat.returncode == 0, chat.stderr
    assert "too long" not in chat.stdout and f"context is {model.config.max_seq_len} tokens" in chat.stderr

    # Running it again resumes: nothing is prepared or trained twice.
    before = (out / "run/metrics.jsonl").read_text()
    assert main(args) == 0
    assert (out / "run/metrics.jsonl").read_text() == before


def test_quickstart_default_corpus_interrupt_and_resume(tmp_path):
    """The real default (builtin corpus); SIGINT mid-training leaves a checkpoint and a report; a rerun finishes."""
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "lmstack", "quickstart", "--out", str(out), "--steps", "40", "--batch-size", "4",
           "--seq-len", "128"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and not list((out / "run/checkpoints").glob("step-*")):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, output
    assert "Interrupted" in (out / "report.md").read_text()
    lmstack.load_model(out)  # the last checkpoint was published as OUT's model

    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    report = (out / "report.md").read_text()
    assert "Interrupted" not in report and "optimizer steps | 40 of 40" in report
    losses = _val_losses(out)
    assert losses[-1] < losses[0]
