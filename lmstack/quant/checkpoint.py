"""A quantized model on disk: a model directory whose config.json carries `quantization_config`.

Layout (format_version 1):

- `config.json`: the Hugging Face config (with lmstack's exact config under "lmstack", as every
  lmstack directory) plus
  `"quantization_config": {"quant_method": "lmstack", "format_version": 1, "method": "gptq", "bits": 4, ...,
  "modules": {"model.layers.0.self_attn.q_proj": {"kind": "int", "bits": 4, "group_size": 128, "bias": false}, ...}}`.
- `model.safetensors`: lmstack tensor names (`model.layers.N.self_attn.q_proj.*`, for every family).
  Full-precision tensors (embeddings, norms, an unquantized head) as usual; each quantized linear as
    kind "int":   `.qweight` (N, K*bits/8) uint8 packed codes, `.scales` (N, G) fp32, `.zeros` (N, G) uint8
                  (w = (q - zero) * scale; packing and formulas in lmstack.quant.formats);
    kind "nf4":   `.packed` (ceil(N*K/2),) uint8, `.absmax` (blocks,) fp32 or uint8 with `.dq_absmax` fp32 and
                  `.dq_offset` () fp32 when double-quantized (bitsandbytes' layout: lmstack.quant.nf4);
    kind "w8a8":  `.qweight` (N, K) int8, `.scales` (N,) fp32 (activations are quantized at run time);
  and `.bias` fp32 where the layer has one.
- the tokenizer files, copied from the source directory.

transformers does not read this format (its own quantizers each have another); `lmstack export gguf`
is the way to llama.cpp.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lmstack.atomic import atomic_dir
from lmstack.errors import CheckpointError
from lmstack.interop.hf_config import config_from_hf, config_to_hf
from lmstack.model.transformer import Transformer
from lmstack.quant.apply import FORMAT_VERSION
from lmstack.quant.linear import Int8DynamicLinear, IntLinear, NF4Linear, swap_module

WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def module_layout(module: nn.Module) -> dict | None:
    """The config.json entry describing one quantized module (None for an ordinary module)."""
    bias = module.bias is not None if hasattr(module, "bias") else False
    if isinstance(module, IntLinear):
        return {"kind": "int", "bits": module.bits, "group_size": module.group_size, "bias": bias}
    if isinstance(module, NF4Linear):
        return {"kind": "nf4", "quant_type": module.quant_type, "block_size": module.block_size,
                "double_quant": module.double_quant, "bias": bias}
    if isinstance(module, Int8DynamicLinear):
        return {"kind": "w8a8", "bias": bias}
    return None


def build_module(layout: dict, in_features: int, out_features: int, where: str) -> nn.Module:
    kind = layout.get("kind")
    if kind == "int":
        return IntLinear(in_features, out_features, layout["bits"], layout["group_size"], layout["bias"])
    if kind == "nf4":
        return NF4Linear(in_features, out_features, layout["quant_type"], layout["block_size"],
                         layout["double_quant"], layout["bias"])
    if kind == "w8a8":
        return Int8DynamicLinear(in_features, out_features, layout["bias"])
    raise CheckpointError(f"{where}: unknown quantized module kind {kind!r} (written by a newer lmstack?)")


def save_quantized(model: Transformer, path: str | Path, source_dir: str | Path | None = None) -> Path:
    """Atomically write a quantized model (and the tokenizer files of `source_dir`, if any) to `path`."""
    path = Path(path)
    modules = {name: layout for name, m in model.named_modules() if (layout := module_layout(m)) is not None}
    qconfig = {**getattr(model, "quantization_config", {"quant_method": "lmstack",
                                                         "format_version": FORMAT_VERSION}), "modules": modules}
    state = model.state_dict()
    if model.config.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):
        state.pop("lm_head.weight", None)  # the embedding matrix; safetensors stores no shared tensors
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}
    hf = config_to_hf(model.config, "float32") | {"quantization_config": qconfig}
    with atomic_dir(path) as tmp:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt", "lmstack_quantized": str(FORMAT_VERSION)})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        generation = {k: getattr(model.config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                      if getattr(model.config, k) is not None}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if source_dir is not None and (Path(source_dir) / name).exists():
                shutil.copyfile(Path(source_dir) / name, tmp / name)
    return path


def load_quantized(directory: str | Path, hf: dict, device: torch.device | str | None = None) -> Transformer:
    """A quantized model directory (config.json already read into `hf`) -> the Transformer with its
    quantized modules in place."""
    directory = Path(directory)
    qconfig = hf["quantization_config"]
    where = directory / "config.json"
    if qconfig.get("quant_method") != "lmstack":
        raise CheckpointError(f"{where}: quantization_config.quant_method is {qconfig.get('quant_method')!r}; "
                              f"lmstack reads its own quantized directories only (dequantize it with the tool "
                              f"that wrote it, e.g. transformers, and load the full-precision directory)")
    version = qconfig.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{where}: quantized format version {version}, but this lmstack reads up to "
                              f"{FORMAT_VERSION}; upgrade lmstack to load it")
    config = config_from_hf(hf, str(where))
    with torch.device("meta"):
        model = Transformer(config)
    for name, layout in qconfig.get("modules", {}).items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where}: quantized module {name} is not in this architecture") from None
        swap_module(model, name, build_module(layout, linear.in_features, linear.out_features, str(where)))
    file = directory / WEIGHTS
    if not file.exists():
        raise CheckpointError(f"{directory}: no {WEIGHTS}")
    try:
        with safe_open(file, framework="pt") as f:
            state = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:  # its message names no file
        raise CheckpointError(f"{file}: not a readable safetensors file, truncated or corrupt ({e}); copy or save "
                              "it again") from None
    expected = model.state_dict()
    head_tied = config.tie_word_embeddings and isinstance(model.lm_head, nn.Linear)  # not quantized on its own
    tied = {"lm_head.weight"} if head_tied else set()
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {unexpected[0]}"
        raise CheckpointError(f"{file}: {what} ({len(missing)} missing, {len(unexpected)} unexpected)")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{file}: tensor {name} has shape {tuple(tensor.shape)}, expected "
                                  f"{tuple(expected[name].shape)} from config.json")
        if expected[name].is_floating_point() and tensor.dtype != expected[name].dtype and tensor.is_floating_point():
            state[name] = tensor.to(expected[name].dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if head_tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers()
    model.quantization_config = {k: v for k, v in qconfig.items() if k != "modules"}
    return model.to(device) if device is not None else model


__all__ = ["load_quantized", "module_layout", "save_quantized"]
