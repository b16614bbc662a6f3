"""`lmstack serve`'s argument errors are one line and exit 1, before anything listens."""

from __future__ import annotations

from lmstack.cli import VERBS, main


def test_serve_is_a_verb_and_fails_fast(tmp_path, capsys):
    assert VERBS["serve"] == "lmstack.cli.serve:main"
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 1
    assert "no such model directory (--model)" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--max-batch", "0"]) == 1
    assert "--max-batch must be >= 1, got 0" in capsys.readouterr().err
