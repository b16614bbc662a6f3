"""Load and save Hugging Face model directories (config.json + safetensors, sharded with an index when large).

Loading builds the model on the meta device and assigns tensors read one at a time from the
safetensors files, so a checkpoint never sits in memory twice. Saving writes into a temporary
directory renamed into place at the end: a crash leaves either the old directory or the new one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lmstack.atomic import atomic_dir
from lmstack.config import PRESETS, ModelConfig, preset
from lmstack.errors import CheckpointError, ConfigError
from lmstack.interop import families
from lmstack.interop.hf_config import hf_incompatibility
from lmstack.interop.hf_moe import mixtral_to_hf, mixtral_to_lmstack
from lmstack.interop.safetensors_io import INDEX_FILE, open_weights, tensor_files, write_tensors
from lmstack.model.transformer import Transformer
from lmstack.schema import read_json

DEFAULT_SHARD_BYTES = 5 * 1024**3
# Tensors some checkpoints carry that hold no learned weights (old GPT-2 mask buffers, RoPE caches).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


# ------------------------------------------------------------------------------------------- names
def _gpt2_prefix(names: set[str]) -> str:
    return "transformer." if any(n.startswith("transformer.") for n in names) else ""


def hf_to_lmstack(name: str, tensor: torch.Tensor, config: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """One Hugging Face tensor -> the lmstack tensors it holds (GPT-2's fused c_attn becomes q/k/v)."""
    if config.family == "mixtral":
        return [(mixtral_to_lmstack(name), tensor)]
    if config.family != "gpt2":
        return [(name, tensor)]
    name = name.removeprefix("transformer.")
    simple = {"wte.weight": "model.embed_tokens.weight", "wpe.weight": "model.embed_positions.weight",
              "ln_f.weight": "model.norm.weight", "ln_f.bias": "model.norm.bias", "lm_head.weight": "lm_head.weight"}
    if name in simple:
        return [(simple[name], tensor)]
    if not name.startswith("h."):
        return [(name, tensor)]  # reported as unexpected by the caller
    _, layer, rest = name.split(".", 2)
    prefix = f"model.layers.{layer}."
    module, leaf = rest.rsplit(".", 1)  # e.g. "attn.c_attn", "weight"
    if leaf == "weight" and module in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        tensor = tensor.t()  # Conv1D stores (in, out); nn.Linear wants (out, in)
    if module == "attn.c_attn":
        q, k, v = tensor.chunk(3, dim=0)
        return [(f"{prefix}self_attn.{p}_proj.{leaf}", t.contiguous()) for p, t in zip("qkv", (q, k, v))]
    targets = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attn.o_proj",
               "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
    if module not in targets:
        return [(name, tensor)]
    return [(f"{prefix}{targets[module]}.{leaf}", tensor.contiguous())]


def lmstack_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """lmstack state dict -> Hugging Face tensor names and layouts (tied lm_head left out, as HF does)."""
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if config.family == "mixtral":
            yield mixtral_to_hf(name), tensor
            continue
        if config.family != "gpt2" or hf_incompatibility(config) is not None:
            yield name, tensor
            continue
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            prefix = f"transformer.h.{layer}."
            if module in ("self_attn.k_proj", "self_attn.v_proj"):
                continue  # written with q_proj as the fused c_attn
            if module == "self_attn.q_proj":
                qkv = [state[f"model.layers.{layer}.self_attn.{p}_proj.{leaf}"] for p in "qkv"]
                fused = torch.cat(qkv, dim=0)
                yield f"{prefix}attn.c_attn.{leaf}", fused.t() if leaf == "weight" else fused
                continue
            targets = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.o_proj": "attn.c_proj",
                       "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
            is_conv = module in ("self_attn.o_proj", "mlp.up_proj", "mlp.down_proj") and leaf == "weight"
            yield f"{prefix}{targets[module]}.{leaf}", tensor.t() if is_conv else tensor
        else:
            simple = {"model.embed_tokens.weight": "transformer.wte.weight",
                      "model.embed_positions.weight": "transformer.wpe.weight",
                      "model.norm.weight": "transformer.ln_f.weight", "model.norm.bias": "transformer.ln_f.bias"}
            yield simple[name], tensor


# ------------------------------------------------------------------------------------------- load
def _lmstack_quantized(hf: object) -> bool:
    """config.json of a directory `lmstack quantize` wrote (load_model hands those to lmstack.quant.checkpoint)."""
    quantization = hf.get("quantization_config") if isinstance(hf, dict) else None
    return isinstance(quantization, dict) and quantization.get("quant_method") == "lmstack"


def read_config(directory: str | Path) -> ModelConfig:
    """config.json -> ModelConfig. Another tool's quantized checkpoint is refused: its packed tensors would be
    misread (lmstack's own quantized directories load through lmstack.quant.checkpoint)."""
    path = Path(directory) / "config.json"
    hf = read_json(path, CheckpointError, "not found; a model directory needs config.json")
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    quantization = hf.get("quantization_config")
    if quantization is not None and not _lmstack_quantized(hf):
        method = quantization.get("quant_method", "unnamed") if isinstance(quantization, dict) else quantization
        raise CheckpointError(f"{path}: quantization_config (quant_method {method!r}) is not supported yet; lmstack "
                              "reads unquantized weights only (use the unquantized checkpoint, or dequantize it "
                              "with transformers and save_pretrained)")
    return families.decoder_config_from_hf(hf, str(path))


def _read_tensors(directory: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor of the directory under its lmstack name, names and shapes checked against `config`.

    A tied config's lm_head.weight is read too when the file has one: the caller decides what it means.
    """
    files = tensor_files(directory)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(config).state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        if not file.exists():
            raise CheckpointError(f"{file}: listed in {INDEX_FILE} but missing")
        with open_weights(file) as f:
            for hf_name in names:
                if hf_name.endswith(_IGNORED_SUFFIXES):
                    continue
                tensor = f.get_tensor(hf_name)
                if not tensor.is_floating_point():
                    raise CheckpointError(f"{file}: tensor {hf_name} has dtype {tensor.dtype}; expected floating point")
                for name, converted in hf_to_lmstack(hf_name, tensor, config):
                    if name not in expected:
                        raise CheckpointError(f"{file}: unexpected tensor {hf_name} for a {config.family} model "
                                              f"with this config.json (is it another architecture?)")
                    if tuple(converted.shape) != tuple(expected[name]):
                        raise CheckpointError(f"{file}: tensor {hf_name} has shape {tuple(tensor.shape)}, but "
                                              f"config.json implies {tuple(expected[name])} for {name}")
                    state[name] = converted
    return state


def _separate_head(state: dict[str, torch.Tensor], config: ModelConfig) -> bool:
    """For a tied config: drop a stored head equal to the embedding; True when the file holds a different one."""
    head = state.get("lm_head.weight")
    if not config.tie_word_embeddings or head is None:
        return False
    if torch.equal(head, state.get("model.embed_tokens.weight", head)):
        del state["lm_head.weight"]  # saved twice (some exporters do): one matrix, still tied
        return False
    return True


def _check_complete(state: dict[str, torch.Tensor], config: ModelConfig, directory: Path) -> None:
    with torch.device("meta"):
        expected = set(Transformer(config).state_dict())
    tied_head = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(expected - set(state) - tied_head)
    if missing == ["lm_head.weight"]:
        raise CheckpointError(f"{directory}: missing tensor lm_head.weight; config.json has tie_word_embeddings "
                              "false, so the output head must be in the weights (if this model reuses its "
                              "embedding matrix as the head, set \"tie_word_embeddings\": true in config.json)")
    if missing:
        raise CheckpointError(f"{directory}: missing tensor {missing[0]} ({len(missing)} missing in all)")


def load_state_dict(directory: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Read a directory's weights into lmstack names, checking names and shapes against `config` (kept as given)."""
    directory = Path(directory)
    state = _read_tensors(directory, config)
    if _separate_head(state, config):
        raise CheckpointError(f"{directory}: the config ties the embeddings (tie_word_embeddings true) but the "
                              "weights hold a different lm_head.weight; pass an untied config (lmstack.load_model "
                              "unties it, as transformers does)")
    _check_complete(state, config, directory)
    return state


def read_model(directory: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """config.json and the weights of a directory, as transformers would assemble them.

    A config that ties the embeddings while the weights hold a different lm_head.weight is untied with a
    warning (transformers 5 does the same; dropping the stored head would change the model's outputs).
    """
    directory = Path(directory)
    config = read_config(directory)
    state = _read_tensors(directory, config)
    if _separate_head(state, config):
        warnings.warn(f"{directory}: config.json sets tie_word_embeddings true, but the weights hold an "
                      "lm_head.weight that differs from model.embed_tokens.weight; keeping both (untied), as "
                      "transformers does. Set \"tie_word_embeddings\": false in config.json to silence this.",
                      UserWarning, stacklevel=3)
        config = config.replace(tie_word_embeddings=False)
    _check_complete(state, config, directory)
    return config, state


def load_model(path_or_preset: str | Path, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None, adapter: str | Path | None = None,
               **overrides: Any) -> Transformer:
    """A Hugging Face / lmstack model directory, or a preset name (random init, ModelConfig `overrides` applied).

    adapter: a peft-format adapter directory (LoRA, rsLoRA, DoRA; written by lmstack or by peft) applied on
    top, unmerged (lmstack.adapters.merge_adapters folds it in; unload() makes a plain model again).
    Every keyword is checked: a directory takes dtype, device and adapter only, a preset also ModelConfig
    fields; a misspelt or unsupported option is a ConfigError naming it, never silently ignored.
    """
    path = Path(path_or_preset)
    other = families.other_architecture(path) if path.is_dir() else None
    if other is not None:  # an encoder (bert) or encoder-decoder (t5) directory
        if overrides:
            raise ConfigError(f"load_model({str(path)!r}): unknown {_names(overrides)}; a model directory "
                              "takes dtype and device only")
        return families.load_other(path, other, dtype, device)
    if path.is_dir():
        if overrides:
            raise ConfigError(f"load_model({str(path)!r}): unknown {_names(overrides)}; a model directory "
                              "takes dtype, device and adapter only (ModelConfig overrides apply to a preset name; edit "
                              "config.json to change a checkpoint's config)")
        hf = read_json(path / "config.json", CheckpointError, "not found; a model directory needs config.json")
        if _lmstack_quantized(hf):  # written by `lmstack quantize`: its own loader (lmstack.quant.checkpoint)
            from lmstack.quant.checkpoint import load_quantized
            return load_quantized(path, hf, device)
        config, state = read_model(path)
        with torch.device("meta"):
            model = Transformer(config)
        if dtype is None:  # CPU policy: compute in fp32 whatever the file holds
            dtype = torch.float32
        state = {k: v.to(dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.reset_buffers()
    elif str(path_or_preset) in PRESETS:
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = {k: v for k, v in overrides.items() if k not in fields}
        if unknown:
            raise ConfigError(f"load_model({str(path_or_preset)!r}): unknown {_names(unknown)}; a preset "
                              f"takes dtype, device and ModelConfig fields ({', '.join(sorted(fields))})")
        model = Transformer(preset(str(path_or_preset), **overrides))
        if dtype is not None:
            model = model.to(dtype)
    elif (other_model := families.preset_model(str(path_or_preset), overrides)) is not None:
        model = other_model.to(dtype) if dtype is not None else other_model  # an encoder / encoder-decoder preset
    else:
        raise CheckpointError(f"{path_or_preset}: neither a model directory nor a preset name "
                              f"(presets: {', '.join(sorted(PRESETS))})")
    if adapter is not None:
        from lmstack.adapters.peft_format import load_adapter
        model = load_adapter(model, adapter)
    return model.to(device) if device is not None else model


def _names(arguments: dict[str, Any]) -> str:
    """'argument 'x'' or 'arguments 'x', 'y'' for a message."""
    return ("argument " if len(arguments) == 1 else "arguments ") + ", ".join(repr(n) for n in sorted(arguments))


# ------------------------------------------------------------------------------------------- save
def write_weights(model: Transformer, directory: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                  dtype: torch.dtype | None = None) -> None:
    """Write config.json, generation_config.json and the safetensors weights into an existing directory."""
    directory = Path(directory)
    if families.write_other(model, directory, max_shard_bytes, dtype):  # an Encoder or Seq2Seq
        return
    config = model.config
    dtype = dtype or model.lm_head.weight.dtype
    tensors = {name: t.detach().to("cpu", dtype).contiguous().clone()
               for name, t in lmstack_to_hf(model.state_dict(), config)}
    write_tensors(tensors, directory, max_shard_bytes)
    dtype_name = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(families.decoder_config_to_hf(config, dtype_name), indent=2) + "\n")
    generation = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if getattr(config, k) is not None}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def save_model(model: Transformer, path: str | Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
               dtype: torch.dtype | None = None, extra_files: dict[str, str | bytes | Path] | None = None) -> Path:
    """Atomically write `model` as a Hugging Face directory at `path`.

    extra_files: name -> text, bytes, or a Path to copy (e.g. tokenizer.json), written into the same directory.
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_weights(model, tmp, max_shard_bytes, dtype)
        for name, content in (extra_files or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copyfile(content, target)
            elif isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
    return path


__all__ = ["CheckpointError", "ConfigError", "load_model", "load_state_dict", "read_config", "read_model",
           "save_model", "write_weights"]
