"""Every shipped fine-tuning config loads into the schema (unknown keys or wrong types would fail here)."""

from pathlib import Path
from typing import get_args

import pytest

from lmstack.schema import load_config
from lmstack.train.recipes.finetune import FinetuneConfig, Method

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("finetune-*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(FinetuneConfig, path)
    assert cfg.data.train and cfg.method in get_args(Method)
