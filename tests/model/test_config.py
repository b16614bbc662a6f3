"""ModelConfig validation of the special token ids against the vocabulary."""

from __future__ import annotations

import pytest

from lmstack import ModelConfig, preset
from lmstack.errors import ConfigError

TINY = dict(vocab_size=100, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64)


@pytest.mark.parametrize("field, value, shown", [
    ("bos_token_id", 100, "100"),
    ("bos_token_id", -1, "-1"),
    ("eos_token_id", 250, "250"),
    ("eos_token_id", [2, 100], "100"),  # every id of a list is checked
    ("pad_token_id", 128000, "128000"),
])
def test_special_ids_outside_the_vocabulary_are_refused(field, value, shown):
    with pytest.raises(ConfigError, match=rf"^{field} {shown} is outside the vocabulary \[0, 100\) of vocab_size 100"):
        ModelConfig(**TINY, **{field: value})


def test_special_ids_inside_the_vocabulary_are_kept():
    config = ModelConfig(**TINY, bos_token_id=0, eos_token_id=[98, 99], pad_token_id=99)
    assert (config.bos_token_id, config.eos_token_ids, config.pad_token_id) == (0, [98, 99], 99)


def test_large_preset_on_a_small_vocabulary_cannot_keep_its_bos():
    # the pretraining mistake behind this check: llama-1b's bos 128000 kept on a 4096-token dataset
    with pytest.raises(ConfigError, match=r"bos_token_id 128000 is outside the vocabulary \[0, 4096\)"):
        preset("llama-1b", vocab_size=4096)
    assert preset("llama-1b", vocab_size=4096, bos_token_id=1, eos_token_id=2).vocab_size == 4096


def test_replace_validates_too():
    config = ModelConfig(**TINY, eos_token_id=99)
    with pytest.raises(ConfigError, match="eos_token_id 99 is outside the vocabulary"):
        config.replace(vocab_size=50)
