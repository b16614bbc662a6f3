"""Atomic outputs: published files follow the umask like any program's output, and a place that cannot be
written is one OutputError naming the user's path, never a temporary name or raw errno text."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import lmstack
from lmstack.atomic import atomic_dir, atomic_file, current_umask
from lmstack.errors import OutputError
from lmstack.tokenizer import train_tokenizer


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_published_files_and_directories_follow_the_umask(tmp_path, umask):
    assert current_umask() == umask
    with atomic_file(tmp_path / "report.md") as f:
        f.write("hello")
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o666 & ~umask
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a")
    model = lmstack.Transformer(lmstack.preset("llama-tiny", vocab_size=300))
    lmstack.save_model(model, tmp_path / "model")  # safetensors itself creates its files 0600
    train_tokenizer(iter(["hello world"] * 20), "bpe", 270).save(tmp_path / "tok")
    for root in (tmp_path / "out", tmp_path / "model", tmp_path / "tok"):
        modes = _modes(root)
        assert modes, root
        for name, mode in modes.items():
            is_dir = (root / name).is_dir()
            assert mode == (0o777 if is_dir else 0o666) & ~umask, (root, name, oct(mode))


def test_an_unwritable_output_names_the_path_without_errno_or_temporary_names(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = {Path("/proc/lmstack-out"): "the directory does not accept new files",
             blocker / "out": f"{blocker} is a file, not a directory"}
    for path, reason in cases.items():
        for write in (lambda p: atomic_dir(p).__enter__(), lambda p: atomic_file(p).__enter__()):
            with pytest.raises(OutputError) as e:
                write(path)
            message = str(e.value)
            assert message == f"{path}: cannot write the output there ({reason})"
            assert "Errno" not in message and ".tmp-" not in message


def test_cli_outputs_that_cannot_be_written_are_one_line(tmp_path, capsys):
    from lmstack.cli import main

    text = tmp_path / "a.txt"
    text.write_text("hello world, " * 100)
    for argv in (["tokenizer", "train", "--input", str(text), "--vocab-size", "270", "--out", "/proc/x/tok"],
                 ["quickstart", "--out", "/proc/x"],
                 ["data", "prepare", "--input", str(text), "--train-tokenizer", "char", "--out", "/proc/x"],
                 ["data", "prepare", "--input", str(text), "--train-tokenizer", "char", "--out", f"{text}/x"]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot write the output there" in err[0], err
        assert "Errno" not in err[0] and ".tmp-" not in err[0]
