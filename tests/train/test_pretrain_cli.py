"""`lmstack pretrain` as a user meets it: --out, --print-config, what to do after training (the final
checkpoint and how to chat with it), checkpoints/latest and best, and one-line errors for a broken
checkpoint on --resume and for a device this machine does not have."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import pytest
import torch
import yaml

import lmstack
from lmstack.cli import main

MODEL = ["--model.hidden_size=32", "--model.num_layers=1", "--model.num_heads=2", "--model.num_kv_heads=1",
         "--model.intermediate_size=64", "--model.max_seq_len=32"]
FAST = ["--train.seq_len=16", "--train.batch_size=2", "--train.progress=false", "--train.peak_flops=1e12",
        "--train.eval_windows=2", "--train.threads=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Token shards with a BPE tokenizer (ChatML template), written by `lmstack data prepare`."""
    root = tmp_path_factory.mktemp("pretrain-cli")
    rng = random.Random(0)
    words = "the cat sat on a mat and then ran to the garden where it saw a bird".split()
    (root / "text.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)))
    assert main(["data", "prepare", "--input", str(root / "text.txt"), "--train-tokenizer", "bpe:300", "--no-clean",
                 "--no-dedup", "--split", "tail", "--val-fraction", "0.1", "--workers", "0",
                 "--out", str(root / "data")]) == 0
    return root / "data"


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> tuple[Path, str]:
    """A 3-step run (a checkpoint and an evaluation every step) -> (its output directory, stderr)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("run") / "r"
    old_mask = os.umask(0o022)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            assert main(["pretrain", "--out", str(out), f"--data.path={data}", "--train.steps=3",
                         "--train.checkpoint_every=1", "--train.eval_every=1", "--train.keep_last=1",
                         *MODEL, *FAST]) == 0
    finally:
        os.umask(old_mask)
    return out, err.getvalue()


def test_after_training_the_hint_names_the_final_checkpoint_and_how_to_chat(run):
    out, err = run
    checkpoints = out / "checkpoints"
    assert f"lmstack pretrain: final checkpoint {checkpoints / 'step-00000003'} (also {checkpoints / 'latest'})" in err
    assert f"chat with it:      lmstack chat --model {checkpoints / 'latest'}" in err
    assert f"generate with it:  lmstack generate --model {checkpoints / 'latest'}" in err


def test_latest_and_best_name_checkpoints_that_load(run):
    checkpoints = run[0] / "checkpoints"
    assert os.readlink(checkpoints / "latest") == "step-00000003"
    assert os.readlink(checkpoints / "best") in (checkpoints / "best.json").read_text()
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(
        {"best", "best.json", "latest", "step-00000003", os.readlink(checkpoints / "best")})
    via_link = lmstack.load_model(checkpoints / "latest")
    direct = lmstack.load_model(checkpoints / "step-00000003")
    assert all(torch.equal(a, b) for a, b in zip(via_link.state_dict().values(), direct.state_dict().values()))


def test_checkpoints_are_readable_by_others_under_the_usual_umask(run):
    step = run[0] / "checkpoints" / "step-00000003"
    assert stat.S_IMODE(step.stat().st_mode) == 0o755
    for file in step.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


def test_print_config_resolves_the_model_against_the_data(data, tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "r"), f"--data.path={data}", *MODEL, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["out_dir"] == str(tmp_path / "r") and printed["model"]["vocab_size"] == 300
    assert printed["model"]["hidden_size"] == 32 and printed["train"]["steps"] == 1000
    assert not (tmp_path / "r").exists()


def test_a_truncated_checkpoint_on_resume_is_one_line_naming_the_file(run, tmp_path, capsys):
    import shutil

    out = tmp_path / "r"
    shutil.copytree(run[0], out, symlinks=True)
    weights = out / "checkpoints" / "step-00000003" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    data_path = yaml.safe_load((out / "config.yaml").read_text())["data"]["path"]
    assert main(["pretrain", "--out", str(out), f"--data.path={data_path}", "--resume", "--train.steps=4",
                 *MODEL, *FAST]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        f"lmstack pretrain: error: {weights}: not a readable safetensors file, truncated or corrupt"), err


def test_a_device_this_machine_lacks_is_one_line(data, tmp_path, capsys):
    cases = [("--train.device=tpu", "--train.device=tpu (command line): expected one of 'auto', 'cpu', 'cuda'")]
    if not torch.cuda.is_available():
        cases.append(("--train.device=cuda", "device 'cuda': torch.cuda.is_available() is False"))
    for option, words in cases:
        assert main(["pretrain", "--out", str(tmp_path / "r"), f"--data.path={data}", option, *MODEL, *FAST]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
        assert not (tmp_path / "r").exists()


def test_an_output_that_cannot_be_written_is_one_line(data, capsys):
    assert main(["pretrain", "--out", "/proc/lmstack-run", f"--data.path={data}", "--train.steps=1", *MODEL, *FAST]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("lmstack pretrain: error: /proc/lmstack-run: cannot write the output there (the directory "
                       "does not accept new files)"), err
