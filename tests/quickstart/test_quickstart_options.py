"""`lmstack quickstart`'s options: refused before anything is written, compared with the run OUT holds on a
rerun, and a failed run leaves no OUT behind. (The end-to-end runs are in test_quickstart.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmstack.cli import main
from lmstack.cli.quickstart import main as quickstart_main
from lmstack.quickstart import PLAN_FILE, QuickstartPlan, prepare_config
from lmstack.schema import to_dict


@pytest.mark.parametrize("option, value, words", [
    ("--steps", "0", "expected a positive integer, got '0'"),
    ("--steps", "-1", "expected a positive integer, got '-1'"),
    ("--seq-len", "0", "expected a positive integer, got '0'"),
    ("--batch-size", "0", "expected a positive integer, got '0'"),
    ("--minutes", "0", "expected a positive number, got '0'"),
    ("--preset", "llama-9t", "invalid choice: 'llama-9t'"),
])
def test_impossible_numbers_are_usage_errors_before_anything_is_written(tmp_path, capsys, option, value, words):
    out = tmp_path / "qs"
    with pytest.raises(SystemExit) as e:
        quickstart_main(["--out", str(out), option, value])
    assert e.value.code == 2 and f"argument {option}: {words}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("argv, words", [
    (["--vocab-size", "100"], "--vocab-size 100: a byte-level BPE vocabulary needs at least 261 tokens"),
    (["--corpus", "NOWHERE"], "NOWHERE: no such file or directory"),
    (["--corpus", "builtin:nope"], "--corpus builtin:nope: unknown built-in corpus (known: builtin:python-docs)"),
    (["--resume"], "holds no quickstart run to continue"),
])
def test_bad_choices_are_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    assert main(["quickstart", "--out", "qs", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "qs").exists()


def test_a_failed_new_run_leaves_no_output(tmp_path, capsys):
    """Every document of this corpus fails the quality filters: the data stage fails after OUT was created."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("too short to keep\n")
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--corpus", str(corpus), "--vocab-size", "300"]) == 1
    assert "no documents left after cleaning" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".qs*"))


def _started_run(out: Path, **options) -> QuickstartPlan:
    """OUT as a run started with `options` leaves it (its plan written, as before the data stage)."""
    plan = QuickstartPlan(**options)
    out.mkdir()
    (out / PLAN_FILE).write_text(json.dumps(to_dict(plan)))
    return plan


def test_a_rerun_with_other_options_is_refused_naming_them(tmp_path, capsys):
    out, corpus = tmp_path / "qs", tmp_path / "corpus.txt"
    corpus.write_text("some text\n")
    _started_run(out, vocab_size=300, seq_len=64, corpus=[str(corpus)])
    before = (out / PLAN_FILE).read_text()
    assert main(["quickstart", "--out", str(out), "--corpus", str(corpus), "--vocab-size", "400"]) == 1
    err = capsys.readouterr().err.strip()
    assert (f"{out} holds a quickstart run started with --vocab-size 300 --seq-len 64, but this command asks for "
            f"--vocab-size 400 --seq-len 256") in err
    assert f"lmstack quickstart --out {out} --resume" in err and "--restart" in err
    # --resume compares only what is given: the stored options are the run's
    assert main(["quickstart", "--out", str(out), "--resume", "--preset", "llama-tiny"]) == 1
    assert "started with --preset (default model), but this command asks for --preset llama-tiny" in \
        capsys.readouterr().err
    assert (out / PLAN_FILE).read_text() == before  # nothing was touched


def test_restart_deletes_a_quickstart_run_but_never_another_directory(tmp_path, capsys):
    out = tmp_path / "qs"
    _started_run(out, vocab_size=300)
    (out / "data").mkdir()
    corpus = tmp_path / "short.txt"
    corpus.write_text("too short to keep\n")
    # --restart starts over with the new options (here a corpus that fails: then nothing is left at all)
    assert main(["quickstart", "--out", str(out), "--restart", "--corpus", str(corpus), "--vocab-size", "400"]) == 1
    assert "--restart: deleting the run" in capsys.readouterr().err and not out.exists()

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["quickstart", "--out", str(other), "--restart"]) == 1
    assert "exists and holds no quickstart run" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"


def test_quickstart_prepares_its_data_as_data_prepare_does(tmp_path):
    """The same PrepareConfig (the built-in corpus's quality defaults included) as the equivalent command."""
    from lmstack.cli.data import build_config

    ours = prepare_config(QuickstartPlan(), tmp_path / "data")
    theirs, _ = build_config(["--corpus", "builtin:python-docs", "--train-tokenizer", "bpe:4096",
                              "--val-fraction", "0.05", "--out", str(tmp_path / "data")])
    assert ours == theirs and ours.quality.max_top_ngram_char_fraction == {}  # builtin turns the n-gram rules off


def test_help_tells_the_truth(capsys):
    with pytest.raises(SystemExit):
        quickstart_main(["--help"])
    text = capsys.readouterr().out
    assert "4.5M" not in text and "3.95M" in text and "--resume" in text and "--restart" in text
    assert "llama-30m" in text  # the presets are listed
