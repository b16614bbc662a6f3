"""Adapter directories in peft's format: `adapter_config.json` + `adapter_model.safetensors`.

    save_adapter(model, directory)      what `peft.PeftModel.from_pretrained(hf_base, directory)` loads
    load_adapter(model, directory)      an adapter peft (or lmstack) wrote, applied to an lmstack model
    AdapterStore                        the training engine's ModelStore: every checkpoint is an adapter directory

Tensor keys are peft's: `base_model.model.<Hugging Face module>.lora_A.weight`, `.lora_B.weight`,
`.lora_magnitude_vector` (DoRA), `base_model.model.<module>.weight` (modules_to_save) and
`base_model.model.<embedding>.token_adapter.trainable_tokens_delta` (trainable tokens).

GPT-2: peft adapts the fused `c_attn` (output = q | k | v). A c_attn adapter of rank r is three adapters
sharing A: q gets (A, B[:d]), k (A, B[d:2d]), v (A, B[2d:]). lmstack's independent q/k/v adapters are
written as one c_attn adapter of rank r_q + r_k + r_v: A stacked, B block-diagonal (zero where a part has
no adapter), with rank_pattern / alpha_pattern so that peft's scaling stays s; this is exact, not an
approximation. DoRA's magnitude is per output row, so it concatenates (a part without an adapter gets its
rows' ||W||, which leaves them unchanged).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmstack.adapters.config import LoraConfig
from lmstack.adapters.inject import (
    adapters,
    is_adapter_parameter,
    set_module,
    wrap_modules_to_save,
    wrap_trainable_tokens,
)
from lmstack.adapters.lora import LoraLinear, dense_weight
from lmstack.adapters.method_format import (
    METHOD_TYPES,
    adapter_kind,
    check_tensors_match,
    load_method_adapter,
    method_tensors,
    saved_rows,
)
from lmstack.adapters.modules import ModulesToSave, TrainableTokens, resize_vocab
from lmstack.adapters.names import fused_conv1d, hf_module, lmstack_modules
from lmstack.atomic import atomic_dir
from lmstack.errors import CheckpointError, ConfigError
from lmstack.schema import read_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
SUPPORTED_TYPES = ("LORA", *METHOD_TYPES)  # the others: lmstack.adapters.method_format
STATE_FILE = "lmstack_adapter_state.safetensors"  # a checkpoint's trainable tensors by lmstack name (resume)
_TOKENS_LEAF = "token_adapter.trainable_tokens_delta"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


# ------------------------------------------------------------------------------------------- save
def adapter_tensors(model: nn.Module, state: dict[str, torch.Tensor] | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model's adapters as (peft-keyed tensors, adapter_config.json fields). `state` (lmstack parameter
    names -> tensors, e.g. a checkpoint's) overrides the values in the model."""
    config = model.config
    values = {n: p.detach() for n, p in model.named_parameters() if is_adapter_parameter(n)}
    values.update(state or {})
    kind = adapter_kind(model)
    if kind != "LORA":
        tensors, fields = method_tensors(model, kind, values)
        return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in tensors.items()}, fields
    tensors: dict[str, torch.Tensor] = {}
    lora = {name: m for name, m in adapters(model) if isinstance(m, LoraLinear)}
    if not lora:
        raise ConfigError("the model has no LoRA adapter to save")
    dora = {m.use_dora for m in lora.values()}
    rslora = {m.use_rslora for m in lora.values()}
    if len(dora) > 1 or len(rslora) > 1:
        raise ConfigError("cannot save adapters that mix LoRA and DoRA (or rsLoRA and LoRA) in one directory")
    use_dora, use_rslora = dora.pop(), rslora.pop()
    groups: dict[str, list[tuple[int | None, str, LoraLinear]]] = {}
    for name, module in lora.items():
        hf, part = hf_module(name, config)
        groups.setdefault(hf, []).append((part, name, module))
    first = next(iter(lora.values()))
    r0, alpha0 = first.r, first.lora_alpha
    ranks: dict[str, tuple[int, float]] = {}
    for hf, parts in groups.items():
        if parts[0][0] is None:
            _, name, m = parts[0]
            a, b = values[f"{name}.lora_A.weight"], values[f"{name}.lora_B.weight"]
            mag = values.get(f"{name}.lora_magnitude_vector")
            ranks[hf] = (m.r, m.lora_alpha)
        else:
            a, b, mag, ranks[hf] = _fuse_qkv(model, hf, parts, values, use_rslora)
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = a
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = b
        if use_dora:
            tensors[f"{PREFIX}{hf}.lora_magnitude_vector"] = mag
    modules_to_save, token_indices = [], {}
    for name, module in adapters(model):
        hf = hf_module(name, config)[0]
        if isinstance(module, ModulesToSave):
            if fused_conv1d(config) and name.startswith("model.layers."):
                raise ConfigError(f"modules_to_save {name}: a GPT-2 block layer is stored fused / transposed by "
                                  "Hugging Face; save only embeddings, norms or the head in full")
            modules_to_save.append(hf)
            for leaf in dict(module.modules_to_save.named_parameters()):
                tensors[f"{PREFIX}{hf}.{leaf}"] = values[f"{name}.modules_to_save.{leaf}"]
        elif isinstance(module, TrainableTokens):
            token_indices[hf.rsplit(".", 1)[-1]] = module.token_indices.tolist()
            key = f"{name}.trainable_tokens_delta"
            if key in values:  # a tied head shares the embedding's delta: stored once, under the embedding
                tensors[f"{PREFIX}{hf}.{_TOKENS_LEAF}"] = values[key]
    rank_pattern = {hf: r for hf, (r, _) in ranks.items() if r != r0}
    alpha_pattern = {hf: a for hf, (_, a) in ranks.items() if a != alpha0}
    tied = getattr(config, "tie_word_embeddings", False)  # an Encoder's config has no such field
    # an encoder with a classifier head is peft's sequence classification (PeftModelForSequenceClassification)
    task = "SEQ_CLS" if "classifier" in getattr(config, "heads", ()) else "CAUSAL_LM"
    fields = {
        "peft_type": "LORA", "task_type": task, "base_model_name_or_path": None, "r": r0,
        "lora_alpha": alpha0, "lora_dropout": _dropout(first), "target_modules": sorted(groups),
        "use_rslora": use_rslora, "use_dora": use_dora, "fan_in_fan_out": fused_conv1d(config), "bias": "none",
        "modules_to_save": modules_to_save or None, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "trainable_token_indices": (next(iter(token_indices.values())) if tied and token_indices
                                    else token_indices or None),
        "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
        "revision": None,
    }
    cpu = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in tensors.items()}
    return cpu, fields


def _dropout(module: LoraLinear) -> float:
    return module.lora_dropout.p if isinstance(module.lora_dropout, nn.Dropout) else 0.0


def _fuse_qkv(model: nn.Module, hf: str, parts: list, values: dict, use_rslora: bool):
    """q/k/v adapters -> one c_attn adapter: A stacked (sum r, d_in), B block-diagonal (3d, sum r)."""
    by_part = {part: (name, m) for part, name, m in parts}
    names = lmstack_modules(hf, model.config)
    s_ref = parts[0][2].scaling
    a_rows, b_blocks, mags, outs = [], [], [], []
    for part, name in enumerate(names):
        module = model.get_submodule(name)
        out = module.out_features
        outs.append(out)
        if part in by_part:
            _, m = by_part[part]
            a_rows.append(values[f"{name}.lora_A.weight"])
            b_blocks.append((values[f"{name}.lora_B.weight"] * (m.scaling / s_ref), part))
            mags.append(values.get(f"{name}.lora_magnitude_vector"))
        else:  # no adapter on this third: zero rows of B; DoRA magnitude = ||W|| (a factor of one)
            mags.append(torch.linalg.vector_norm(dense_weight(module).detach().float(), dim=1))
    rank = sum(a.shape[0] for a in a_rows)
    a = torch.cat(a_rows)
    b = a.new_zeros(sum(outs), rank)
    col = 0
    for block, part in b_blocks:
        row = sum(outs[:part])
        b[row:row + block.shape[0], col:col + block.shape[1]] = block
        col += block.shape[1]
    alpha = s_ref * (math.sqrt(rank) if use_rslora else rank)
    mag = torch.cat([m.float() for m in mags]) if all(m is not None for m in mags) else None
    return a, b, mag, (rank, alpha)


def save_adapter(model: nn.Module, directory: str | Path, *, base_model_name_or_path: str | None = None,
                 state: dict[str, torch.Tensor] | None = None, extra_files: dict[str, Path] | None = None) -> Path:
    """Atomically write the model's adapters as a peft adapter directory (plus `extra_files`, e.g. a tokenizer)."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        write_adapter(model, tmp, base_model_name_or_path=base_model_name_or_path, state=state)
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)
    return directory


def write_adapter(model: nn.Module, directory: Path, *, base_model_name_or_path: str | None = None,
                  state: dict[str, torch.Tensor] | None = None) -> None:
    tensors, fields = adapter_tensors(model, state)
    fields["base_model_name_or_path"] = base_model_name_or_path
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(fields, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------- load
_UNSUPPORTED = {"bias": "none", "lora_bias": False, "layers_to_transform": None, "layer_replication": None,
                "use_qalora": False, "target_parameters": None}


def read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors by peft key) of an adapter directory; errors name the file."""
    directory = Path(directory)
    fields = read_json(directory / CONFIG_FILE, CheckpointError, "not found; an adapter directory needs it")
    if not isinstance(fields, dict):
        raise CheckpointError(f"{directory / CONFIG_FILE}: expected a JSON object")
    kind = fields.get("peft_type")
    if kind not in SUPPORTED_TYPES:
        raise CheckpointError(f"{directory / CONFIG_FILE}: peft_type {kind!r} is not an adapter lmstack loads "
                              f"({', '.join(SUPPORTED_TYPES)})")
    for key, default in _UNSUPPORTED.items():
        if fields.get(key, default) not in (default, [], {}):
            raise CheckpointError(f"{directory / CONFIG_FILE}: {key} = {fields[key]!r} is not supported by lmstack "
                                  f"(only {default!r})")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        extra = " (only pickle adapter_model.bin found; lmstack reads safetensors)" \
            if (directory / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"{weights}: not found{extra}")
    with safe_open(weights, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    return fields, tensors


def lora_config_from_peft(fields: dict[str, Any]) -> LoraConfig:
    tokens = fields.get("trainable_token_indices") or []
    if isinstance(tokens, dict):
        tokens = sorted({i for ids in tokens.values() for i in ids})
    return LoraConfig(r=int(fields.get("r", 8)), lora_alpha=float(fields.get("lora_alpha", 8)),
                      lora_dropout=float(fields.get("lora_dropout") or 0.0),
                      target_modules=fields.get("target_modules") or "all-linear",
                      use_rslora=bool(fields.get("use_rslora", False)), use_dora=bool(fields.get("use_dora", False)),
                      modules_to_save=list(fields.get("modules_to_save") or []),
                      trainable_token_indices=list(tokens),
                      rank_pattern=dict(fields.get("rank_pattern") or {}),
                      alpha_pattern=dict(fields.get("alpha_pattern") or {}))


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the adapter in `directory` (peft's format, written by peft or by lmstack) to `model`, in place.

    The vocabulary grows first when the adapter trained rows beyond it (new special tokens). An adapter
    made for another base model is refused, naming the first tensor that does not fit. The adapter's
    parameters are left trainable (training can continue), everything else frozen.
    """
    directory = Path(directory)
    fields, tensors = read_adapter(directory)
    where = directory / WEIGHTS_FILE
    check_tensors_match(fields["peft_type"], tensors, where)
    if fields["peft_type"] != "LORA":
        # rows the run added for new tokens: trained ones come as modules_to_save matrices; the tokenizer's size
        # covers an adapter written before lmstack saved them (the new rows then stay at their mean init)
        vocab = max([_tokenizer_vocab(directory)] + [t.shape[0] for t in saved_rows(fields, tensors).values()])
        if vocab > model.config.vocab_size:
            resize_vocab(model, vocab)
        load_method_adapter(model, fields, tensors, where)
        for name, param in model.named_parameters():
            param.requires_grad_(is_adapter_parameter(name))
        return model
    cfg = lora_config_from_peft(fields)
    by_module = _group_by_module(tensors, where)
    config = model.config
    needed = max([i + 1 for i in cfg.trainable_token_indices]
                 + [t.shape[0] for k, t in tensors.items() if k.endswith(("embed_tokens.weight", "wte.weight"))]
                 + [0])
    if needed > config.vocab_size:
        resize_vocab(model, needed)
    ours = dict(model.named_modules())
    for hf, leaves in by_module.items():
        if "lora_A.weight" not in leaves:
            continue
        names = lmstack_modules(hf, config)
        missing = [n for n in names if n not in ours]
        if missing:
            raise CheckpointError(f"{where}: tensor {PREFIX}{hf}.lora_A.weight adapts module {hf}, which this "
                                  f"{config.family} model does not have: is the adapter for another base model?")
        r, alpha = cfg.rank_and_alpha([hf, names[0]])
        a, b = leaves["lora_A.weight"], leaves.get("lora_B.weight")
        if b is None:
            raise CheckpointError(f"{where}: {PREFIX}{hf}.lora_A.weight has no lora_B.weight beside it")
        offset = 0
        for name in names:
            base = ours[name]
            out = base.out_features
            expected_a, expected_b = (r, base.in_features), (out if len(names) == 1 else sum(
                ours[n].out_features for n in names), r)
            for leaf, tensor, shape in (("lora_A.weight", a, expected_a), ("lora_B.weight", b, expected_b)):
                if tuple(tensor.shape) != shape:
                    raise CheckpointError(f"{where}: tensor {PREFIX}{hf}.{leaf} has shape {tuple(tensor.shape)}, but "
                                          f"this base model needs {shape} (r={r}): is the adapter for another base "
                                          "model?")
            module = LoraLinear(base, r, alpha, cfg.lora_dropout, cfg.use_rslora, cfg.use_dora)
            with torch.no_grad():
                weight = module.lora_A.weight
                module.lora_A.weight.copy_(a.to(weight.dtype))
                module.lora_B.weight.copy_(b[offset:offset + out].to(weight.dtype))
                if cfg.use_dora:
                    mag = leaves.get("lora_magnitude_vector")
                    if mag is None or mag.shape[0] != b.shape[0]:
                        raise CheckpointError(f"{where}: use_dora is set but {PREFIX}{hf}.lora_magnitude_vector is "
                                              "missing or of the wrong length")
                    module.lora_magnitude_vector.copy_(mag[offset:offset + out].to(weight.dtype))
            set_module(model, name, module)
            offset += out
    _load_extras(model, cfg, by_module, where)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_parameter(name))
    return model


def _tokenizer_vocab(directory: Path) -> int:
    """The vocabulary of the tokenizer saved beside an adapter (0 when there is none)."""
    if not (directory / "tokenizer.json").is_file():
        return 0
    from tokenizers import Tokenizer as Backend
    return Backend.from_file(str(directory / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def _group_by_module(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, dict[str, torch.Tensor]]:
    """peft keys -> {Hugging Face module: {leaf: tensor}}."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{where}: tensor {key} does not start with {PREFIX!r}; not a peft causal-LM adapter")
        body = key[len(PREFIX):]
        for leaf in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", _TOKENS_LEAF):
            if body.endswith("." + leaf):
                grouped.setdefault(body[:-len(leaf) - 1], {})[leaf] = tensor
                break
        else:
            module, _, leaf = body.rpartition(".")
            grouped.setdefault(module, {})["saved." + leaf] = tensor
    return grouped


def _load_extras(model: nn.Module, cfg: LoraConfig, by_module: dict, where: Path) -> None:
    """modules_to_save (whole trained modules) and trainable token rows."""
    config = model.config
    for hf, leaves in by_module.items():
        saved = {k.removeprefix("saved."): v for k, v in leaves.items() if k.startswith("saved.")}
        if saved:
            names = lmstack_modules(hf, config)
            if len(names) != 1 or names[0] not in dict(model.named_modules()):
                raise CheckpointError(f"{where}: tensor {PREFIX}{hf}.{next(iter(saved))} belongs to module {hf}, "
                                      "which this model does not have")
            wrapper = wrap_modules_to_save(model, names[0])
            target = model.get_submodule(wrapper[0]).modules_to_save
            _copy_into(target, saved, f"{where}: {PREFIX}{hf}")
    if cfg.trainable_token_indices:
        wrap_trainable_tokens(model, cfg.trainable_token_indices)
        for hf, leaves in by_module.items():
            if _TOKENS_LEAF in leaves:
                name = lmstack_modules(hf, config)[0]
                delta = model.get_submodule(name).trainable_tokens_delta
                if delta.shape != leaves[_TOKENS_LEAF].shape:
                    raise CheckpointError(f"{where}: tensor {PREFIX}{hf}.{_TOKENS_LEAF} has shape "
                                          f"{tuple(leaves[_TOKENS_LEAF].shape)}, expected {tuple(delta.shape)}")
                with torch.no_grad():
                    delta.copy_(leaves[_TOKENS_LEAF])


def _copy_into(module: nn.Module, saved: dict[str, torch.Tensor], where: str) -> None:
    params = dict(module.named_parameters())
    for leaf, tensor in saved.items():
        if leaf not in params:
            raise CheckpointError(f"{where}.{leaf}: the module has no parameter {leaf}")
        if params[leaf].shape != tensor.shape:
            raise CheckpointError(f"{where}.{leaf} has shape {tuple(tensor.shape)}, but this model's is "
                                  f"{tuple(params[leaf].shape)}: is the adapter for another base model?")
        with torch.no_grad():
            params[leaf].copy_(tensor)


# ------------------------------------------------------------------------------------------- the engine's store
@dataclass
class AdapterStore:
    """Checkpoints of an adapter run (the engine's ModelStore): each one a peft adapter directory, with
    `extra_files` (the tokenizer) copied beside, so `PeftModel.from_pretrained` and `lmstack chat --adapter`
    open any checkpoint as is. The model already carries its adapters when a run resumes."""

    base_model_name_or_path: str | None = None
    extra_files: dict[str, Path] = field(default_factory=dict)

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu").clone() for n, p in model.named_parameters() if is_adapter_parameter(n)}

    def write(self, model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
        write_adapter(model, directory, base_model_name_or_path=self.base_model_name_or_path, state=state)
        if adapter_kind(model) != "LORA":  # e.g. P-tuning's encoder, which the adapter file does not hold
            save_file({k: v.contiguous() for k, v in state.items()}, directory / STATE_FILE)
        for name, source in self.extra_files.items():
            shutil.copyfile(source, directory / name)

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        return read_adapter(directory)[1]

    def load_into(self, model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
        """Back into the model's existing adapters: q/k/v from a fused c_attn by their ranks (block-diagonal)."""
        config = model.config
        expected = {n: p for n, p in model.named_parameters() if is_adapter_parameter(n)}
        kind, saved = adapter_kind(model), read_adapter(directory)[0]["peft_type"]
        if kind != saved:
            raise CheckpointError(f"{directory}: the checkpoint holds a {saved} adapter, but this run trains {kind}; "
                                  "resume with the method the run started with")
        if kind != "LORA":
            with safe_open(directory / STATE_FILE, framework="pt") as f:
                by_name = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            with torch.no_grad():
                for name, param in expected.items():
                    if name not in by_name or by_name[name].shape != param.shape:
                        raise CheckpointError(f"{directory / STATE_FILE}: no tensor of shape {tuple(param.shape)} "
                                              f"for {name}: was the run's adapter configuration changed?")
                    param.copy_(by_name[name])
            return
        by_module = _group_by_module(state, directory / WEIGHTS_FILE)
        restored: dict[str, torch.Tensor] = {}
        for name, module in adapters(model):
            hf, part = hf_module(name, config)
            leaves = by_module.get(hf, {})
            if isinstance(module, LoraLinear):
                if part is None:
                    restored[f"{name}.lora_A.weight"] = leaves.get("lora_A.weight")
                    restored[f"{name}.lora_B.weight"] = leaves.get("lora_B.weight")
                    restored[f"{name}.lora_magnitude_vector"] = leaves.get("lora_magnitude_vector")
                else:
                    restored.update(_split_qkv(model, hf, name, part, leaves))
            elif isinstance(module, ModulesToSave):
                for leaf in dict(module.modules_to_save.named_parameters()):
                    restored[f"{name}.modules_to_save.{leaf}"] = leaves.get("saved." + leaf)
            elif isinstance(module, TrainableTokens):
                restored[f"{name}.trainable_tokens_delta"] = leaves.get(_TOKENS_LEAF)
        with torch.no_grad():
            for name, param in expected.items():
                tensor = restored.get(name)
                if tensor is None or tensor.shape != param.shape:
                    raise CheckpointError(f"{directory}: no tensor of shape {tuple(param.shape)} for adapter "
                                          f"parameter {name}: was the run's adapter configuration changed?")
                param.copy_(tensor)


def _split_qkv(model: nn.Module, hf: str, name: str, part: int, leaves: dict) -> dict[str, torch.Tensor]:
    names = lmstack_modules(hf, model.config)
    mods = [model.get_submodule(n) for n in names]
    ranks = [m.r if isinstance(m, LoraLinear) else 0 for m in mods]
    outs = [m.out_features for m in mods]
    row, col = sum(outs[:part]), sum(ranks[:part])
    r, out = ranks[part], outs[part]
    s_ref = next(m.scaling for m in mods if isinstance(m, LoraLinear))
    module = mods[part]
    split = {f"{name}.lora_A.weight": leaves["lora_A.weight"][col:col + r],
             f"{name}.lora_B.weight": leaves["lora_B.weight"][row:row + out, col:col + r] * (s_ref / module.scaling)}
    if "lora_magnitude_vector" in leaves:
        split[f"{name}.lora_magnitude_vector"] = leaves["lora_magnitude_vector"][row:row + out]
    return split


__all__ = [
    "CONFIG_FILE",
    "STATE_FILE",
    "WEIGHTS_FILE",
    "AdapterStore",
    "adapter_tensors",
    "is_adapter_dir",
    "load_adapter",
    "lora_config_from_peft",
    "read_adapter",
    "save_adapter",
    "write_adapter",
]
