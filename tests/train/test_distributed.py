"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 follow the 1-process loss curve with the same global
batch, and their checkpoints resume in a 1-process run (a different world size)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmstack.train.metrics import read_metrics

from .conftest import write_split


STEPS = 10


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    tokens = np.random.default_rng(0).integers(0, 60, 20000)
    write_split(root / "data" / "train", tokens[:18000], 64, 63, shard_tokens=5000)
    write_split(root / "data" / "val", tokens[18000:], 64, 63, shard_tokens=5000)
    return root


def _args(data: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    return ["pretrain", f"--data.path={data / 'data'}", f"--out_dir={out}", "--model.preset=llama-tiny",
            "--model.max_seq_len=32", f"--train.steps={STEPS}", "--train.seq_len=16", f"--train.batch_size={batch_size}",
            "--train.eval_every=5", "--train.eval_windows=16", "--train.checkpoint_every=5", "--train.progress=false",
            "--train.threads=1", "--optim.lr=3e-3", *extra]


def _single(data: Path, out: Path, *extra: str) -> None:
    subprocess.run([sys.executable, "-m", "lmstack", *_args(data, out, 8, *extra)], check=True, capture_output=True)


def _torchrun(data: Path, out: Path, *extra: str) -> None:
    """2 processes x batch 2 x 2 accumulated micro-batches: the same 8-window global batch as `_single`, and the
    accumulation path (no gradient sync on the first micro-batch: DDP no_sync, FSDP2 set_requires_gradient_sync)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmstack",
           *_args(data, out, 2, "--train.grad_accum=2", *extra)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


def _curve(out: Path, kind: str = "train", key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == kind}


@pytest.fixture(scope="module")
def reference(data: Path) -> Path:
    out = data / "single"
    _single(data, out)
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process_and_resume_at_world_size_one(data: Path, reference: Path, strategy: str):
    out = data / strategy
    _torchrun(data, out, f"--train.distributed={strategy}")
    ref = _curve(reference)
    got = _curve(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert abs(got[step] - ref[step]) < 1e-5, (step, got[step], ref[step])
        assert abs(_curve(out, key="grad_norm")[step] - _curve(reference, key="grad_norm")[step]) < 1e-4
    for step, val in _curve(reference, "eval", "val_loss").items():
        assert abs(_curve(out, "eval", "val_loss")[step] - val) < 1e-5

    # The 2-process checkpoint at step 5 continues in ONE process (batch 8: the same global batch).
    resumed = data / f"{strategy}-resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS:08d}")
    _single(data, resumed, "--resume")
    again = _curve(resumed)
    assert sorted(again) == list(range(1, STEPS + 1))
    for step in range(STEPS // 2 + 1, STEPS + 1):
        assert abs(again[step] - ref[step]) < 1e-5, (step, again[step], ref[step])
