"""`lmstack info`: binary memory units, path-like arguments, and --list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lmstack
from lmstack.cli import info as info_cli
from lmstack.cli import main


def _run(capsys, *argv):
    code = main(["info", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_memory_is_printed_in_binary_units(capsys):
    code, out, _ = _run(capsys, "llama-8b")
    assert code == 0
    # 8,030,261,248 parameters: x4 bytes / 2**30 = 29.92 GiB; x0.5 = 3.74 GiB; AdamW x16 = 119.7 GiB
    assert "weights fp32     29.9 GiB" in out and "weights int4     3.74 GiB" in out
    assert "train (AdamW)    120 GiB" in out
    code, out, _ = _run(capsys, "llama-tiny")
    assert "weights fp32     489 KiB" in out  # 125,248 x 4 / 1024 = 489.25
    for si_looking in (" KB", " MB", " GB", " TB"):
        assert si_looking not in out
    forward = json.loads(_run(capsys, "llama-tiny", "--json")[1])["forward_flops_per_token"]
    assert f"forward {forward / 1000:.0f} kFLOP" in out  # FLOPs stay decimal (1 kFLOP = 1000)


@pytest.mark.parametrize("argument", ["/no/such/dir", "./missing-model", "runs/missing", "~/missing-model-xyz"])
def test_a_path_like_argument_that_does_not_exist_is_no_such_directory(capsys, argument):
    code, _, err = _run(capsys, argument)
    assert code == 1
    assert f"{argument}: no such directory" in err and "preset" not in err


def test_a_file_is_not_a_directory_and_a_bare_name_is_a_preset(capsys, tmp_path):
    (tmp_path / "model.json").write_text("{}")
    code, _, err = _run(capsys, str(tmp_path / "model.json"))
    assert code == 1 and "model.json: not a directory" in err
    code, _, err = _run(capsys, "llama-tinyy")
    assert code == 1 and "unknown preset 'llama-tinyy'" in err


def test_list_shows_every_preset_with_family_and_parameters_and_the_recipes(capsys):
    code, out, _ = _run(capsys, "--list")
    assert code == 0
    for name in lmstack.PRESETS:
        assert name in out, name
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert lines["gpt2"].split()[1:3] == ["gpt2", "124M"] and "(= gpt2-124m)" in lines["gpt2"]  # 124,439,808
    assert lines["llama-8b"].split()[1:3] == ["llama", "8.03B"]  # 8,030,261,248
    assert lines["qwen2-0.5b"].split()[1:3] == ["qwen2", "494M"]  # 494,032,768
    configs = sorted(Path(info_cli.RECIPES_DIR).glob("*.yaml"))
    assert configs, "the repository's configs/ should be found from a source checkout"
    for path in configs:
        assert path.name in lines
    assert "lmstack pretrain --config" in out

    listed = json.loads(_run(capsys, "--list", "--json")[1])
    tiny = next(row for row in listed["presets"] if row["name"] == "llama-tiny")
    assert tiny["parameters"] == lmstack.load_model("llama-tiny").num_parameters()
    assert {Path(r["path"]).name for r in listed["recipes"]} == {p.name for p in configs}


def test_list_without_a_configs_directory_still_lists_the_presets(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(info_cli, "RECIPES_DIR", tmp_path / "absent")  # an installed package: no configs/
    code, out, _ = _run(capsys, "--list")
    assert code == 0 and "llama-tiny" in out and "recipes: none here" in out


def test_no_model_and_no_list_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["info"])
    assert exit_info.value.code == 2
    assert "give a model directory or a preset name" in capsys.readouterr().err
