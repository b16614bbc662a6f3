"""lmstack.schema on the inputs a user gets wrong: where an error is reported, and in which words."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from lmstack.errors import ConfigError
from lmstack.schema import from_dict, json_error, load_config, load_yaml, read_json
from lmstack.train.config import PretrainConfig


def test_invalid_utf8_in_a_yaml_file_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"train:\n  steps: 5\n  seed: \xff1\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(path)
    assert str(e.value) == f"{path}:3: not valid UTF-8 (byte 0xff at column 9); save it as UTF-8"


def test_invalid_utf8_in_a_json_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{\n"a": "\xc3("}\n')
    with pytest.raises(ConfigError, match=rf"^{path}:2: not valid UTF-8 \(byte 0xc3 at column 7\)"):
        read_json(path)


@pytest.mark.parametrize("text, words", [
    ('{"a": "open', "Unterminated string starting at column 7"),  # json's own text ends in "at"
    ('{"a": }', "Expecting value at column 7"),
    ('{"a": 1} x', "Extra data at column 10"),
])
def test_json_errors_read_as_words(tmp_path, text, words):
    with pytest.raises(json.JSONDecodeError) as e:
        json.loads(text)
    assert json_error(e.value) == words
    path = tmp_path / "f.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        read_json(path)
    assert str(raised.value) == f"{path}:1: invalid JSON ({words})" and "at at" not in str(raised.value)


def test_a_bad_override_is_reported_as_the_command_line_not_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, path, ["--train.stpes=5"])
    assert str(e.value).startswith("--train.stpes=5 (command line): unknown key train.stpes (known keys: ")
    assert str(path) not in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, path, ["--train.steps=abc"])
    assert str(e.value) == "--train.steps=abc (command line): expected an integer, got 'abc'"
    # A mistake in the file is still the file's, with an override present.
    path.write_text("train:\n  stepz: 5\n")
    with pytest.raises(ConfigError, match=rf"^{path}: unknown key train.stepz"):
        load_config(PretrainConfig, path, ["--train.seed=1"])
    # A check across fields that only the overrides break names them.
    path.write_text("schedule:\n  warmup_steps: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, path, ["--schedule.decay_steps=5"])
    assert str(e.value) == ("schedule.decay_steps (5) must exceed warmup_steps (10) (with the command-line options "
                            "--schedule.decay_steps=5)")


@dataclass
class _Opt:
    size: int | None = None
    names: list[str] = field(default_factory=list)


def test_optional_fields_are_described_in_words():
    with pytest.raises(ConfigError) as e:
        load_config(_Opt, None, ["--size=big"])
    assert str(e.value) == "--size=big (command line): expected an integer or null, got 'big'"


def test_a_section_that_sets_some_keys_keeps_the_owners_other_defaults():
    """A recipe's `optim` defaults (weight_decay 0.0) survive a config that sets only the learning rate; keys the
    recipe left at the class default stay the class default; an explicit value wins."""
    from lmstack.train.recipes.finetune import FinetuneConfig

    base = FinetuneConfig()
    assert base.optim.weight_decay == 0.0 and base.optim.lr == 2e-4  # the recipe's choice, not OptimConfig's
    cfg = from_dict(FinetuneConfig, {"optim": {"lr": 3e-4}})
    assert cfg.optim.lr == 3e-4 and cfg.optim.weight_decay == 0.0
    assert cfg.optim.betas == base.optim.betas
    assert from_dict(FinetuneConfig, {"optim": {"weight_decay": 0.1}}).optim.weight_decay == 0.1
    assert from_dict(FinetuneConfig, {"train": {"steps": 5}}).train.seq_len == base.train.seq_len == 512
