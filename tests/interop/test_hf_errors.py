"""Bad checkpoints get one clear error naming the file and tensor; saving is all-or-nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmstack
from lmstack.errors import CheckpointError, ConfigError


@pytest.fixture()
def tiny_dir(tmp_path):
    model = lmstack.load_model("llama-tiny")
    return lmstack.save_model(model, tmp_path / "tiny")


def test_unknown_architecture(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    config["model_type"] = "falcon"
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config.json: model_type 'falcon' is not supported"):
        lmstack.load_model(tiny_dir)


def test_missing_tensor_names_it(tiny_dir):
    weights = load_file(tiny_dir / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tiny_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        lmstack.load_model(tiny_dir)


def test_wrong_shape_names_file_and_tensor(tiny_dir):
    weights = load_file(tiny_dir / "model.safetensors")
    weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(7, 64)
    save_file(weights, tiny_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.layers.0.self_attn.k_proj.weight "
                                              r"has shape \(7, 64\), but config.json implies \(32, 64\)"):
        lmstack.load_model(tiny_dir)


def test_integer_tensor_is_a_dtype_error(tiny_dir):
    weights = load_file(tiny_dir / "model.safetensors")
    weights["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(weights, tiny_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.norm.weight has dtype torch.int32"):
        lmstack.load_model(tiny_dir)


def test_pickle_checkpoint_is_refused(tiny_dir):
    (tiny_dir / "model.safetensors").rename(tiny_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle weights"):
        lmstack.load_model(tiny_dir)


def test_bad_config_json_names_the_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "model_type": "llama",\n  oops\n}')
    with pytest.raises(CheckpointError, match=r"config.json:3: invalid JSON"):
        lmstack.load_model(tmp_path)


def test_unknown_name_is_neither_dir_nor_preset():
    with pytest.raises(CheckpointError, match="neither a model directory nor a preset"):
        lmstack.load_model("no-such-model-xyz")


def test_failed_save_leaves_old_directory_intact(tiny_dir, monkeypatch):
    before = sorted(p.name for p in tiny_dir.iterdir())
    model = lmstack.load_model("llama-tiny")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lmstack.interop.safetensors_io.save_file", boom)  # where every weight file is written
    with pytest.raises(OSError, match="disk full"):
        lmstack.save_model(model, tiny_dir)
    assert sorted(p.name for p in tiny_dir.iterdir()) == before
    assert [p.name for p in tiny_dir.parent.iterdir()] == ["tiny"]  # no temporary directory left behind
    lmstack.load_model(tiny_dir)  # still loads


def test_bf16_checkpoint_loads_as_fp32_by_default(tmp_path):
    model = lmstack.load_model("llama-tiny")
    lmstack.save_model(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16/config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = lmstack.load_model(tmp_path / "bf16")
    assert loaded.lm_head.weight.dtype == torch.float32
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16).float())


def test_cli_info_and_help(tiny_dir, capsys):
    from lmstack.cli import main

    assert main(["info", str(tiny_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == lmstack.load_model("llama-tiny").num_parameters()
    assert main(["info", "llama-125m"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "FLOPs / token" in out
    assert main(["info", "nope"]) == 1
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "lmstack", "info", "nope"], capture_output=True, text=True)
    assert out.returncode == 1 and "unknown preset 'nope'" in out.stderr and "Traceback" not in out.stderr
