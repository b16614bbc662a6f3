"""T5 directories (transformers' T5ForConditionalGeneration) <-> lmstack's Seq2Seq.

Tensor names are the same. Two settings need care because transformers 4 and 5 read them differently:
- the head: a checkpoint without `lm_head.weight` (or with one equal to `shared.weight`) is tied;
- the d^-0.5 scaling of the decoder output: transformers 5 reads `scale_decoder_outputs`, 4 infers it
  from `tie_word_embeddings`. lmstack reads the explicit key when present, else the v4 rule, and
  writes both keys so that either version builds the same model (a tied head without the scaling is
  written untied, with its own copy of the matrix, which both read the same way).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lmstack.errors import CheckpointError, ConfigError
from lmstack.interop.safetensors_io import load_into, tensor_files, unique_state, write_tensors
from lmstack.model.configs import Seq2SeqConfig
from lmstack.model.seq2seq import Seq2Seq
from lmstack.schema import read_json

_KINDS = ("relu", "gelu", "gated-gelu", "gated-relu", "gated-silu")


def config_from_hf(hf: dict[str, Any], tied: bool, source: str) -> Seq2SeqConfig:
    """config.json (+ whether the checkpoint's head is the shared matrix) -> Seq2SeqConfig."""
    kind = hf.get("feed_forward_proj", "relu")
    if kind not in _KINDS:
        raise ConfigError(f"{source}: feed_forward_proj {kind!r} is not supported (supported: {', '.join(_KINDS)})")
    scale = hf.get("scale_decoder_outputs")
    if scale is None:
        scale = hf.get("tie_word_embeddings", True) is not False
    try:
        return Seq2SeqConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf.get("d_model", 512), head_dim=hf.get("d_kv", 64),
            intermediate_size=hf.get("d_ff", 2048), num_layers=hf.get("num_layers", 6),
            num_decoder_layers=hf.get("num_decoder_layers"), num_heads=hf.get("num_heads", 8),
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128), mlp_kind=kind,
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)), dropout=float(hf.get("dropout_rate", 0.1)),
            init_std=float(hf.get("initializer_factor", 1.0)), tie_word_embeddings=tied,
            scale_decoder_outputs=bool(scale), max_seq_len=int(hf.get("n_positions") or 512),
            pad_token_id=hf.get("pad_token_id", 0), eos_token_id=_first(hf.get("eos_token_id", 1)),
            decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)))
    except KeyError as e:
        raise ConfigError(f"{source}: required key {e.args[0]!r} is missing") from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _first(value: int | list[int]) -> int:
    return value[0] if isinstance(value, list) else value


def config_to_hf(config: Seq2SeqConfig, dtype: str = "float32") -> dict[str, Any]:
    """Seq2SeqConfig -> config.json (see the module docstring for the head and its scaling)."""
    tie = config.tie_word_embeddings and config.scale_decoder_outputs  # the one tied form both versions agree on
    return dict(architectures=["T5ForConditionalGeneration"], model_type="t5", vocab_size=config.vocab_size,
                d_model=config.hidden_size, d_kv=config.head_dim, d_ff=config.intermediate_size,
                num_layers=config.num_layers, num_decoder_layers=config.num_decoder_layers,
                num_heads=config.num_heads, relative_attention_num_buckets=config.relative_attention_num_buckets,
                relative_attention_max_distance=config.relative_attention_max_distance,
                feed_forward_proj=config.mlp_kind, layer_norm_epsilon=config.norm_eps, dropout_rate=config.dropout,
                initializer_factor=config.init_std, tie_word_embeddings=tie,
                scale_decoder_outputs=config.scale_decoder_outputs, n_positions=config.max_seq_len,
                is_encoder_decoder=True, pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id,
                decoder_start_token_id=config.decoder_start_token_id, torch_dtype=dtype, use_cache=True)


def _head_is_tied(directory: Path, files: dict[str, Path]) -> bool:
    """True when the checkpoint has no lm_head.weight, or one equal to shared.weight."""
    if "lm_head.weight" not in files:
        return True
    if "shared.weight" not in files:
        raise CheckpointError(f"{directory}: missing tensor shared.weight")
    with safe_open(files["lm_head.weight"], framework="pt") as f:
        head = f.get_tensor("lm_head.weight")
    with safe_open(files["shared.weight"], framework="pt") as f:
        return torch.equal(head, f.get_tensor("shared.weight"))


def read_seq2seq_config(directory: str | Path) -> Seq2SeqConfig:
    directory = Path(directory)
    path = directory / "config.json"
    hf = read_json(path, CheckpointError, "not found; a model directory needs config.json")
    return config_from_hf(hf, _head_is_tied(directory, tensor_files(directory)), str(path))


def load_seq2seq(directory: str | Path, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> Seq2Seq:
    """A T5 directory -> Seq2Seq (fp32 on the CPU unless `dtype`)."""
    directory = Path(directory)
    config = read_seq2seq_config(directory)
    with torch.device("meta"):
        model = Seq2Seq(config)

    def rename(name: str) -> str | None:
        if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            return None  # the shared matrix under another name
        if name == "lm_head.weight" and config.tie_word_embeddings:
            return None  # equal to shared.weight (checked)
        return name

    load_into(model, directory, rename, dtype)
    return model.to(device) if device is not None else model


def write_seq2seq(model: Seq2Seq, directory: Path, max_shard_bytes: int, dtype: torch.dtype | None) -> None:
    config = model.config
    state = unique_state(model, dtype)
    written = config_to_hf(config, str(state["shared.weight"].dtype).removeprefix("torch."))
    if not written["tie_word_embeddings"] and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["shared.weight"].clone()  # tied without scaling: an explicit head
    write_tensors(state, directory, max_shard_bytes)
    (directory / "config.json").write_text(json.dumps(written, indent=2) + "\n")
    generation = dict(decoder_start_token_id=config.decoder_start_token_id, eos_token_id=config.eos_token_id,
                      pad_token_id=config.pad_token_id)
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
