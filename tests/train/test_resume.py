"""`--resume` continues exactly: N steps straight == N/2 steps, a real kill -9, then --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmstack.train.checkpoint import list_checkpoints, load_checkpoint
from lmstack.train.metrics import read_metrics

STEPS = 8


def _cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmstack", "pretrain", f"--data.path={data}", f"--out_dir={out}",
            "--model.preset=llama-tiny", "--model.max_seq_len=32", "--model.dropout=0.1",  # dropout: RNG must resume too
            f"--train.steps={STEPS}", "--train.batch_size=4", "--train.seq_len=16", "--train.grad_accum=2",
            "--train.eval_every=4", "--train.eval_windows=16", f"--train.checkpoint_every={STEPS // 2}",
            "--train.keep_last=3", "--train.progress=false", "--train.threads=1", "--optim.lr=3e-3", "--schedule.warmup_steps=2",
            *extra]


def _train_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


def test_kill_and_resume_is_bitwise_identical(tiny_data: Path, tmp_path: Path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    subprocess.run(_cmd(tiny_data, straight), check=True, capture_output=True)

    # The interrupted run: its steps after the mid-way checkpoint are slowed (a sleep, no numeric change)
    # so that the kill lands mid-training rather than racing the end of the run.
    slow = (f"import sys, time; from lmstack.train.engine import Engine; step = Engine.train_step; "
            f"Engine.train_step = lambda self, s: (time.sleep(0.5) if s >= {STEPS // 2} else None, step(self, s))[1]; "
            f"from lmstack.cli import main; sys.exit(main(sys.argv[1:]))")
    cmd = _cmd(tiny_data, resumed)
    proc = subprocess.Popen([sys.executable, "-c", slow, *cmd[3:]], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        steps = [s for s, _ in _train_losses(resumed)]
        if list_checkpoints(resumed / "checkpoints") and steps and max(steps) > STEPS // 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert max(s for s, _ in _train_losses(resumed)) < STEPS, "the run finished before it was killed"
    assert [p.name for p in list_checkpoints(resumed / "checkpoints")] == [f"step-{STEPS // 2:08d}"]

    subprocess.run(_cmd(tiny_data, resumed, "--resume"), check=True, capture_output=True)
    assert _train_losses(resumed) == _train_losses(straight)  # same floats, same steps, no duplicates
    final = f"checkpoints/step-{STEPS:08d}"
    a, b = load_file(straight / final / "model.safetensors"), load_file(resumed / final / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    oa, ob = load_file(straight / final / "optimizer.safetensors"), load_file(resumed / final / "optimizer.safetensors")
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    evals = lambda out: [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals(resumed) == evals(straight)


def test_checkpoint_is_a_transformers_model_directory(tiny_data: Path, tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    from lmstack.cli.pretrain import main
    out = tmp_path / "run"
    args = [f"--data.path={tiny_data}", f"--out_dir={out}", "--model.preset=llama-tiny", "--model.max_seq_len=32",
            "--train.steps=2", "--train.batch_size=4", "--train.seq_len=16", "--train.grad_accum=2",
            "--train.eval_windows=8", "--train.progress=false", "--train.peak_flops=1e9"]
    assert main(args) == 0
    path = out / "checkpoints" / "step-00000002"
    checkpoint = load_checkpoint(path)
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["data"]["next_step"] == 2 and state["tokens_seen"] == 2 * 4 * 2 * 16
    assert state["run_config"]["train"]["grad_accum"] == 2
    assert set(checkpoint.optimizer_state["state"]) >= {"model.embed_tokens.weight", "model.norm.weight"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    ids = torch.randint(0, 64, (2, 10))
    from lmstack import load_model
    ours = load_model(path).eval()
    torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        main(args)
    with pytest.raises(ValueError, match="unexpected argument 'steps=3'"):
        main(["steps=3"])
