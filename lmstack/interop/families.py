"""Which converter reads or writes a Hugging Face directory: the decoder families and the others.

Decoders (one `Transformer` class): llama, mistral, qwen2, gpt2 (lmstack.interop.hf_config), and the
mixture-of-experts families mixtral and qwen2_moe, whose config.json is a dense family's plus the
expert keys (lmstack.interop.hf_moe). The encoder (bert) and the encoder-decoder (t5) are other model
classes with their own converters (lmstack.interop.hf_bert, hf_t5); `lmstack.load_model` and
`save_model` route to them here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.config import ModelConfig, RopeScaling
from lmstack.errors import CheckpointError
from lmstack.interop import hf_moe
from lmstack.interop.hf_config import config_from_hf, config_to_hf
from lmstack.model.rope import ntk_theta
from lmstack.schema import read_json


# ------------------------------------------------------------------------------------------- decoders
def decoder_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """config.json of any decoder family -> ModelConfig (ConfigError naming `source` and the key otherwise)."""
    if hf.get("model_type") in hf_moe.ARCHITECTURES:
        base, moe = hf_moe.split_hf(hf, source)
        config = config_from_hf(base, source).replace(family=hf["model_type"], moe=moe)
    else:
        config = config_from_hf(hf, source)
    scaling = config.rope_scaling
    if scaling.kind == "dynamic" and config.max_seq_len <= scaling.original_max_position_embeddings:
        # transformers' max_position_embeddings is the trained context that dynamic NTK extends; lmstack's
        # max_seq_len is the longest input it accepts: the extended context
        config = config.replace(max_seq_len=int(scaling.original_max_position_embeddings * scaling.factor))
    return config


def decoder_config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """ModelConfig -> config.json: the family's Hugging Face keys (model_type "lmstack" when it has none)."""
    scaling = config.rope_scaling
    if scaling.kind == "ntk":  # the same frequencies as plain RoPE with a larger theta
        # (read back, it is kind "none" with that theta: the same model)
        return decoder_config_to_hf(config.replace(
            rope_theta=ntk_theta(config.rope_theta, scaling.factor, config.head_dim), rope_scaling=RopeScaling()), dtype)
    if config.moe.num_experts or config.family in hf_moe.ARCHITECTURES:
        if hf_moe.incompatibility(config) is not None:
            return config_to_hf(config, dtype)  # model_type "lmstack"
        out = config_to_hf(hf_moe.base_config(config), dtype)
        if out["model_type"] == "lmstack":  # the dense part itself has no Hugging Face form
            return config_to_hf(config, dtype)
        out.update(model_type=config.family, architectures=[hf_moe.ARCHITECTURES[config.family]],
                   **hf_moe.expert_keys(config))
        return out
    out = config_to_hf(config, dtype)
    if scaling.kind == "dynamic" and out["model_type"] != "lmstack":
        out["max_position_embeddings"] = scaling.original_max_position_embeddings  # transformers' trained context
    return out


# ------------------------------------------------------------------------------------------- other classes
def other_architecture(directory: str | Path) -> str | None:
    """"bert" or "t5" when `directory`'s config.json is one of the non-decoder families, else None."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    hf = read_json(path, CheckpointError)
    model_type = hf.get("model_type") if isinstance(hf, dict) else None
    return model_type if model_type in ("bert", "t5") else None


def load_other(directory: str | Path, kind: str, dtype: torch.dtype | None, device: torch.device | str | None
               ) -> nn.Module:
    """Load a bert / t5 directory as lmstack's Encoder / Seq2Seq."""
    if kind == "bert":
        from lmstack.interop.hf_bert import load_encoder
        return load_encoder(directory, dtype=dtype, device=device)
    from lmstack.interop.hf_t5 import load_seq2seq
    return load_seq2seq(directory, dtype=dtype, device=device)


def preset_model(name: str, overrides: dict[str, Any]) -> nn.Module | None:
    """A randomly initialised Encoder / Seq2Seq for an encoder or encoder-decoder preset name, else None."""
    from lmstack.model.configs import EncoderConfig, architecture_preset
    config = architecture_preset(name, **overrides)
    if config is None:
        return None
    if isinstance(config, EncoderConfig):
        from lmstack.model.encoder import Encoder
        return Encoder(config)
    from lmstack.model.seq2seq import Seq2Seq
    return Seq2Seq(config)


def write_other(model: nn.Module, directory: Path, max_shard_bytes: int, dtype: torch.dtype | None) -> bool:
    """Write an Encoder / Seq2Seq into `directory`; False when `model` is neither (a decoder)."""
    from lmstack.model.transformer import Transformer
    if isinstance(model, Transformer):
        return False
    from lmstack.model.encoder import Encoder
    if isinstance(model, Encoder):
        from lmstack.interop.hf_bert import write_encoder
        write_encoder(model, directory, max_shard_bytes, dtype)
        return True
    from lmstack.model.seq2seq import Seq2Seq
    if isinstance(model, Seq2Seq):
        from lmstack.interop.hf_t5 import write_seq2seq
        write_seq2seq(model, directory, max_shard_bytes, dtype)
        return True
    return False
