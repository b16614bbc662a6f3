"""load_model: every keyword checked, tied heads as transformers assembles them, quantized checkpoints refused."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmstack
from lmstack.cli import main as cli
from lmstack.errors import CheckpointError, ConfigError
from lmstack.interop.hf import load_state_dict, read_config

SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture()
def tiny_dir(tmp_path):
    return lmstack.save_model(lmstack.load_model("llama-tiny"), tmp_path / "tiny")


def _edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ------------------------------------------------------------------------------------------- keywords
@pytest.mark.parametrize("kwargs, named", [(dict(adaptor="lora-dir"), "argument 'adaptor'"),
                                           (dict(dtpye=torch.bfloat16), "argument 'dtpye'"),
                                           (dict(max_seq_len=512, trust_remote_code=True),
                                            "arguments 'max_seq_len', 'trust_remote_code'")])
def test_a_directory_refuses_every_unknown_keyword(tiny_dir, kwargs, named):
    with pytest.raises(ConfigError, match=rf"load_model\('.*tiny'\): unknown {named}; a model directory takes "
                                          r"dtype, device and adapter only"):
        lmstack.load_model(tiny_dir, **kwargs)
    assert lmstack.load_model(tiny_dir, dtype=torch.bfloat16, device="cpu").lm_head.weight.dtype == torch.bfloat16


def test_a_preset_takes_model_config_fields_only():
    with pytest.raises(ConfigError, match=r"load_model\('llama-tiny'\): unknown argument 'hiden_size'; a preset "
                                          r"takes dtype, device and ModelConfig fields \(.*hidden_size"):
        lmstack.load_model("llama-tiny", hiden_size=32)
    with pytest.raises(ConfigError, match="unknown argument 'adaptor'"):
        lmstack.load_model("llama-tiny", adaptor="lora-dir")
    model = lmstack.load_model("llama-tiny", num_layers=1, dtype=torch.bfloat16)
    assert model.config.num_layers == 1 and model.lm_head.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------- tied heads
def _transformers_llama(directory, tie: bool):
    import transformers

    torch.manual_seed(7)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, tie_word_embeddings=tie)).eval()
    model.save_pretrained(directory)
    return model


def test_a_tied_config_with_a_different_stored_head_is_untied_like_transformers(tmp_path):
    import transformers

    saved = _transformers_llama(tmp_path / "hf", tie=False)
    _edit_config(tmp_path / "hf", tie_word_embeddings=True)  # the config now claims the head is the embedding
    with pytest.warns(UserWarning, match=r"tie_word_embeddings true, but the weights hold an lm_head.weight that "
                                         r"differs from model.embed_tokens.weight; keeping both \(untied\)"):
        model = lmstack.load_model(tmp_path / "hf").eval()
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, saved.lm_head.weight)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert reference.lm_head.weight.data_ptr() != reference.model.embed_tokens.weight.data_ptr()  # transformers agrees
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        assert (model(ids) - reference(ids).logits).abs().max().item() <= 1e-4
    # the strict reader, given the tied config, refuses rather than drop the head
    with pytest.raises(CheckpointError, match="ties the embeddings .* but the weights hold a different lm_head"):
        load_state_dict(tmp_path / "hf", read_config(tmp_path / "hf"))


def test_a_stored_head_equal_to_the_embedding_stays_tied(tiny_dir):
    weights = load_file(tiny_dir / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()  # some exporters save both
    save_file(weights, tiny_dir / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = lmstack.load_model(tiny_dir)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_missing_head_mentions_tie_word_embeddings(tmp_path):
    _transformers_llama(tmp_path / "hf", tie=True)  # transformers leaves the tied head out of the file
    assert "lm_head.weight" not in load_file(tmp_path / "hf/model.safetensors")
    _edit_config(tmp_path / "hf", tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match=r"missing tensor lm_head.weight; config.json has tie_word_embeddings "
                                              r"false.*set \"tie_word_embeddings\": true"):
        lmstack.load_model(tmp_path / "hf")


# ------------------------------------------------------------------------------------------- quantized
def test_a_quantized_checkpoint_is_refused_everywhere(tiny_dir, capsys):
    _edit_config(tiny_dir, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})
    message = r"config.json: quantization_config \(quant_method 'gptq'\) is not supported yet"
    with pytest.raises(CheckpointError, match=message):
        lmstack.load_model(tiny_dir)
    with pytest.raises(CheckpointError, match=message):
        read_config(tiny_dir)
    assert cli(["info", str(tiny_dir)]) == 1
    err = capsys.readouterr().err
    assert "quantization_config (quant_method 'gptq') is not supported yet" in err and "Traceback" not in err
