"""config.json edits: the Hugging Face keys are the config, in lmstack as in transformers."""

from __future__ import annotations

import json

import pytest
import torch

import lmstack
from lmstack.errors import ConfigError
from lmstack.interop.hf import read_config
from lmstack.schema import to_dict


def _save(tmp_path, **overrides):
    config = lmstack.preset("llama-tiny", bos_token_id=1, eos_token_id=2, **overrides)
    return lmstack.save_model(lmstack.Transformer(config), tmp_path / "tiny"), config


def _edit(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


def _transformers_logits(directory, ids):
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return reference(ids).logits, reference.config


@pytest.mark.parametrize("key, field, value", [("rope_theta", "rope_theta", 2500.0),
                                               ("max_position_embeddings", "max_seq_len", 512)])
def test_an_edited_hugging_face_key_is_used(tmp_path, key, field, value):
    directory, _ = _save(tmp_path)
    _edit(directory, **{key: value})
    model = lmstack.load_model(directory).eval()
    assert getattr(model.config, field) == value
    ids = torch.randint(0, 512, (1, 300 if field == "max_seq_len" else 40))  # 300 > the saved 256-token context
    expected, hf_config = _transformers_logits(directory, ids)
    assert getattr(hf_config, key, None) == value or hf_config.rope_parameters["rope_theta"] == value
    with torch.no_grad():
        assert (model(ids) - expected).abs().max().item() <= 1e-4  # the same model transformers builds


@pytest.mark.parametrize("key, field, value", [("rope_theta", "rope_theta", 2500.0),
                                               ("max_position_embeddings", "max_seq_len", 512)])
def test_an_older_directory_with_a_stale_lmstack_block_uses_the_edit_and_says_so(tmp_path, key, field, value):
    # lmstack used to write a full copy of the config under "lmstack", which then silently won over the edit
    directory, config = _save(tmp_path)
    _edit(directory, lmstack=to_dict(config), **{key: value})
    with pytest.warns(UserWarning, match=rf"{key} gives {field}={value!r} where lmstack.{field} says "
                                         rf"{getattr(config, field)!r}\); using the Hugging Face keys"):
        assert getattr(read_config(directory), field) == value


def test_an_unedited_older_directory_loads_without_a_word(tmp_path, recwarn):
    directory, config = _save(tmp_path, rope_scaling=dict(kind="linear", factor=2.0))
    _edit(directory, lmstack=to_dict(config))
    assert read_config(directory) == config
    assert not [w for w in recwarn if "lmstack" in str(w.message)]


def test_rope_theta_and_rope_parameters_that_disagree_are_an_error(tmp_path):
    # an older lmstack wrote theta twice; transformers 4 reads rope_theta, transformers 5 rope_parameters
    directory, _ = _save(tmp_path)
    _edit(directory, rope_theta=2500.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    with pytest.raises(ConfigError, match=r"config.json: rope_parameters.rope_theta is 10000.0, rope_theta is "
                                          r"2500.0; transformers 4 reads rope_theta and transformers 5"):
        lmstack.load_model(directory)
    _edit(directory, rope_parameters={"rope_type": "default", "rope_theta": 2500.0})  # agreeing copies are fine
    assert lmstack.load_model(directory).config.rope_theta == 2500.0


def test_rope_scaling_and_rope_parameters_that_disagree_are_an_error(tmp_path):
    directory, _ = _save(tmp_path, rope_scaling=dict(kind="linear", factor=2.0))
    _edit(directory, rope_parameters={"rope_type": "linear", "factor": 4.0})
    with pytest.raises(ConfigError, match=r"rope_scaling is .*'factor': 2.0.* but rope_parameters is .*'factor': 4.0"):
        read_config(directory)


def test_null_means_none_as_in_transformers(tmp_path):
    import transformers

    # Mistral v0.2+ checkpoints say "sliding_window": null (full attention); it is not the class default 4096
    config = transformers.MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                                        bos_token_id=None)
    transformers.MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    ours = read_config(tmp_path / "mistral")
    assert (ours.sliding_window, ours.bos_token_id, ours.eos_token_id) == (None, None, 2)


def test_a_config_no_architecture_expresses_keeps_its_lmstack_block(tmp_path):
    config = lmstack.preset("llama-tiny", mlp_kind="gelu", bos_token_id=1)
    lmstack.save_model(lmstack.Transformer(config), tmp_path / "gelu")
    written = json.loads((tmp_path / "gelu/config.json").read_text())
    assert written["model_type"] == "lmstack" and written["lmstack"]["mlp_kind"] == "gelu"
    assert read_config(tmp_path / "gelu") == config


def test_special_ids_outside_the_vocabulary_name_config_json(tmp_path):
    import transformers

    # GPT2Config's defaults keep GPT-2's bos/eos 50256 even for a 211-token vocabulary
    config = transformers.GPT2Config(vocab_size=211, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match=r"config.json: bos_token_id 50256 is outside the vocabulary \[0, 211\)"):
        lmstack.load_model(tmp_path / "gpt2")
