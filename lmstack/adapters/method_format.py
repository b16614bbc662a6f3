"""Adapter directories of the methods beside LoRA: peft's format for prompt tuning, P-tuning, prefix tuning and
IA3, lmstack's own (same layout) for bottleneck adapters. lmstack.adapters.peft_format dispatches here by the
adapter's `peft_type`.

    PROMPT_TUNING, P_TUNING   {"prompt_embeddings": (P, d)}: the virtual token embeddings (P-tuning: the prompt
                              encoder's output, which is what peft saves and reads back in inference mode)
    PREFIX_TUNING             {"prompt_embeddings": (P, L * 2 * H_kv * D)}: every layer's keys and values
    IA3                       base_model.model.<module>.ia3_l: (out, 1), or (1, in) for a feed-forward module
    LMSTACK_BOTTLENECK        base_model.model.<lmstack module>.adapter_{down,up}.{weight,bias}

New tokens' rows (a run that added special tokens trains them, lmstack.adapters.inject.train_new_rows) go out as
peft's `modules_to_save`: the whole trained matrix under `<prefix><Hugging Face module>.weight`, the prefix being
what peft's get_peft_model_state_dict writes for the method: `base_model.` for prompt / P-tuning / prefix tuning
(the PeftModel's base_model is the transformers model itself), `base_model.model.` for IA3 and bottleneck (a tuner
model wraps it). A tied head is written as its own `lm_head` entry: peft's tied head keeps reading the original
embedding, not the modules_to_save copy. Prompt and P-tuning train (and write) only the head's rows: peft's forward
for those methods embeds the input with the base embedding, never with a modules_to_save copy.

An adapter's `adapter_config.json` and its tensors must agree: a file whose tensors belong to another method is
refused with both named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.adapters.bottleneck import PEFT_TYPE as BOTTLENECK
from lmstack.adapters.bottleneck import BottleneckAdapter
from lmstack.adapters.ia3 import IA3Linear
from lmstack.adapters.inject import adapters, set_module, wrap_modules_to_save
from lmstack.adapters.lora import LoraLinear
from lmstack.adapters.modules import ModulesToSave, TrainableTokens
from lmstack.adapters.names import fused_conv1d, hf_module, lmstack_modules
from lmstack.adapters.prefix import PrefixTuning
from lmstack.adapters.prompt import KVPrefix, PromptTuning
from lmstack.errors import CheckpointError, ConfigError

PREFIX = "base_model.model."
PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
METHOD_TYPES = (*PROMPT_TYPES, "IA3", BOTTLENECK)
_MARKERS = {"LORA": "lora_A.weight", "IA3": "ia3_l", BOTTLENECK: "adapter_down.weight",
            **{t: "prompt_embeddings" for t in PROMPT_TYPES}}


def adapter_kind(model: nn.Module) -> str:
    """The peft_type of the adapter the model carries ("LORA" for LoRA / DoRA / modules_to_save / tokens)."""
    kinds = set()
    if getattr(model, "kv_prefix", None) is not None:
        kinds.add(model.kv_prefix.peft_type)
    for module in model.modules():
        if isinstance(module, IA3Linear):
            kinds.add("IA3")
        elif isinstance(module, BottleneckAdapter):
            kinds.add(BOTTLENECK)
        elif isinstance(module, LoraLinear):
            kinds.add("LORA")
    if len(kinds) > 1:
        raise ConfigError(f"the model carries adapters of several methods ({', '.join(sorted(kinds))}); an adapter "
                          "directory holds one")
    return kinds.pop() if kinds else "LORA"


def check_tensors_match(kind: str, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """The tensors must be the method's: an IA3 config over LoRA weights (or the reverse) is a clear error."""
    marker = _MARKERS[kind]
    if any(k == marker or k.endswith("." + marker) for k in tensors):
        return
    found = next((t for t, m in _MARKERS.items() if any(k == m or k.endswith("." + m) for k in tensors)), None)
    what = f"the tensors of a {found} adapter" if found else "no tensor of this method"
    raise CheckpointError(f"{where}: adapter_config.json says peft_type {kind}, but the weights hold {what} "
                          f"(e.g. {next(iter(tensors), 'nothing')}); the config and the weights disagree")


# ------------------------------------------------------------------------------------------- save
def method_tensors(model: nn.Module, kind: str, values: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, adapter_config.json fields) of a non-LoRA adapter. `values`: lmstack parameter name -> tensor."""
    tensors, fields = _method_tensors(model, kind, values)
    rows, saved = _row_tensors(model, kind, values)
    fields["modules_to_save"] = saved or None
    return {**tensors, **rows}, fields


def _rows_prefix(kind: str) -> str:
    """What peft's get_peft_model_state_dict puts before a modules_to_save key: a prompt-learning PeftModel's
    base_model is the transformers model itself; a tuner model (IA3, and bottleneck like it) wraps it."""
    return "base_model." if kind in PROMPT_TYPES else PREFIX


def _row_tensors(model: nn.Module, kind: str, values: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """The embedding / head matrices with their trained rows, as peft's modules_to_save keys, and the entries."""
    prefix = _rows_prefix(kind)
    canonical = {id(p): n for n, p in model.named_parameters()}  # a tied head's delta is the embedding's
    tensors, saved = {}, []
    for name, module in adapters(model):
        if isinstance(module, TrainableTokens):
            delta = values.get(canonical.get(id(module.trainable_tokens_delta), ""), module.trainable_tokens_delta)
            weight = module.base_layer.weight.detach().index_copy(0, module.token_indices, delta.detach().to(
                module.base_layer.weight.dtype))
        elif isinstance(module, ModulesToSave):
            weight = values.get(f"{name}.modules_to_save.weight", module.modules_to_save.weight).detach()
        else:
            continue
        hf = hf_module(name, model.config)[0]
        tensors[f"{prefix}{hf}.weight"] = weight
        saved.append(hf.rsplit(".", 1)[-1])
    return tensors, saved


def _method_tensors(model: nn.Module, kind: str, values: dict[str, torch.Tensor]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    config = model.config
    fields: dict[str, Any] = {"peft_type": kind, "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
                              "inference_mode": True, "revision": None}
    if kind in PROMPT_TYPES:
        prefix: KVPrefix = model.kv_prefix
        with torch.no_grad():
            table = prefix.prompt_embeddings().detach()
        kv = kind == "PREFIX_TUNING"
        fields.update({"num_virtual_tokens": prefix.num_virtual_tokens, "num_transformer_submodules": 1,
                       "num_layers": config.num_layers,
                       "token_dim": config.num_kv_heads * config.head_dim if kv else config.hidden_size,
                       "num_attention_heads": config.num_kv_heads if kv else config.num_heads})
        fields.update({k: v for k, v in prefix.peft_fields.items() if k != "prompt_tuning_init_text"})
        if kind == "PROMPT_TUNING":  # peft refuses init TEXT without a tokenizer name; the init no longer matters
            fields.update({"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
                           "tokenizer_name_or_path": None, "tokenizer_kwargs": None})
        return {"prompt_embeddings": table}, fields
    if kind == "IA3":
        return _ia3_tensors(model, values, fields)
    adapters = {n: m for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)}
    first = next(iter(adapters.values()))
    fields.update({"target_modules": list(adapters), "bottleneck_size": first.adapter_down.out_features,
                   "non_linearity": first.non_linearity,
                   "placement": "houlsby" if any(n.endswith("o_proj") for n in adapters) else "pfeiffer"})
    tensors = {f"{PREFIX}{n}": values[n] for n in values if ".adapter_down." in n or ".adapter_up." in n}
    return tensors, fields


def _ia3_tensors(model: nn.Module, values: dict, fields: dict) -> tuple[dict, dict]:
    config = model.config
    groups: dict[str, dict[int | None, tuple[str, IA3Linear]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, IA3Linear):
            hf, part = hf_module(name, config)
            groups.setdefault(hf, {})[part] = (name, module)
    tensors, targets, ff = {}, [], []
    for hf, parts in groups.items():
        targets.append(hf)
        if None in parts:
            name, module = parts[None]
            tensors[f"{PREFIX}{hf}.ia3_l"] = values[f"{name}.ia3_l"]
            if module.feedforward:
                ff.append(hf)
            continue
        if any(m.feedforward for _, m in parts.values()):
            raise ConfigError(f"ia3: {hf} is GPT-2's fused q/k/v; peft cannot store it as a feed-forward module")
        thirds = []
        for part, name in enumerate(lmstack_modules(hf, config)):  # a third without IA3 scales by one
            thirds.append(values[f"{name}.ia3_l"] if part in parts else
                          torch.ones(model.get_submodule(name).out_features, 1))
        tensors[f"{PREFIX}{hf}.ia3_l"] = torch.cat(thirds)
    fields.update({"target_modules": sorted(targets), "feedforward_modules": sorted(ff),
                   "fan_in_fan_out": fused_conv1d(config), "init_ia3_weights": True,
                   "exclude_modules": None})
    return tensors, fields


# ------------------------------------------------------------------------------------------- load
def load_method_adapter(model: nn.Module, fields: dict[str, Any], tensors: dict[str, torch.Tensor],
                        where: Path) -> nn.Module:
    """Apply a non-LoRA adapter read from `where` to the model, in place (its parameters trainable, the rest frozen)."""
    kind = fields["peft_type"]
    check_tensors_match(kind, tensors, where)
    rows = saved_rows(fields, tensors)
    tensors = {k: v for k, v in tensors.items() if k not in rows}
    _load_method(model, kind, fields, tensors, where)
    _load_rows(model, kind, rows, where)
    return model


def saved_rows(fields: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's modules_to_save matrices (new tokens' rows), by peft key."""
    saved = fields.get("modules_to_save") or []
    prefix = _rows_prefix(fields["peft_type"])
    return {k: v for k, v in tensors.items() if k.startswith(prefix) and k.endswith(".weight")
            and k[len(prefix):-len(".weight")].rsplit(".", 1)[-1] in saved}


def _load_rows(model: nn.Module, kind: str, rows: dict[str, torch.Tensor], where: Path) -> None:
    """Each saved matrix into a ModulesToSave copy of its module, as peft loads it."""
    prefix = _rows_prefix(kind)
    config = model.config
    for key, tensor in rows.items():
        names = lmstack_modules(key[len(prefix):-len(".weight")], config)
        if len(names) != 1 or names[0] not in dict(model.named_modules()):
            raise CheckpointError(f"{where}: tensor {key} (modules_to_save) names a module this {config.family} model "
                                  "does not have")
        name = names[0]
        if kind in ("PROMPT_TUNING", "P_TUNING") and name == "model.embed_tokens":
            continue  # peft embeds a prompt-tuned model's input with the base embedding, never this copy
        module = model.get_submodule(wrap_modules_to_save(model, name)[0]).modules_to_save
        if module.weight.shape != tensor.shape:
            raise CheckpointError(f"{where}: tensor {key} has shape {tuple(tensor.shape)}, but this model's "
                                  f"{name} is {tuple(module.weight.shape)}: is the adapter for another base model?")
        with torch.no_grad():
            module.weight.copy_(tensor)
        module.requires_grad_(True)


def _load_method(model: nn.Module, kind: str, fields: dict[str, Any], tensors: dict[str, torch.Tensor],
                 where: Path) -> nn.Module:
    config = model.config
    model.requires_grad_(False)
    if kind in PROMPT_TYPES:
        table = tensors["prompt_embeddings"]
        P = int(fields.get("num_virtual_tokens") or table.shape[0])
        width = config.num_layers * 2 * config.num_kv_heads * config.head_dim if kind == "PREFIX_TUNING" \
            else config.hidden_size
        if tuple(table.shape) != (P, width):
            raise CheckpointError(f"{where}: prompt_embeddings has shape {tuple(table.shape)}, but this base model "
                                  f"needs ({P}, {width}) for {kind}: is the adapter for another base model?")
        if P >= config.max_seq_len:
            raise CheckpointError(f"{where}: {P} virtual tokens leave no room in the model's context of "
                                  f"{config.max_seq_len} tokens")
        weight = model.model.embed_tokens.weight
        table = table.to(weight.device, weight.dtype)
        if kind == "PREFIX_TUNING":
            prefix = PrefixTuning(P, config.num_layers, config.num_kv_heads, config.head_dim, None,
                                  weight.device, weight.dtype)
            with torch.no_grad():
                prefix.embedding.weight.copy_(table)
        else:
            prefix = PromptTuning(table)
        prefix.peft_type = kind
        prefix.peft_fields = {k: fields[k] for k in ("prefix_projection", "encoder_hidden_size",
                                                     "encoder_reparameterization_type", "encoder_num_layers",
                                                     "encoder_dropout") if k in fields}
        if getattr(model, "kv_prefix", None) is not None:
            raise CheckpointError(f"{where}: the model already has a prompt / prefix adapter")
        model.kv_prefix = prefix.requires_grad_(True)
        return model
    modules = dict(model.named_modules())
    if kind == "IA3":
        ff = list(fields.get("feedforward_modules") or [])
        for key, tensor in tensors.items():
            hf = key.removeprefix(PREFIX).removesuffix(".ia3_l")
            names = lmstack_modules(hf, config)
            if not key.startswith(PREFIX) or any(n not in modules for n in names):
                raise CheckpointError(f"{where}: tensor {key} adapts a module this {config.family} model does not "
                                      "have: is the adapter for another base model?")
            offset = 0
            for name in names:
                module = IA3Linear(modules[name], feedforward=any(hf == f or hf.endswith("." + f) for f in ff))
                n = module.ia3_l.numel()
                part = tensor if len(names) == 1 else tensor[offset:offset + n]
                if tuple(part.shape) != tuple(module.ia3_l.shape):
                    raise CheckpointError(f"{where}: tensor {key} has shape {tuple(tensor.shape)}, but this base "
                                          f"model needs {tuple(module.ia3_l.shape)}: is it for another base model?")
                with torch.no_grad():
                    module.ia3_l.copy_(part)
                set_module(model, name, module)
                offset += n
        return model
    size, act = int(fields["bottleneck_size"]), str(fields.get("non_linearity", "relu"))
    for name in fields.get("target_modules") or []:
        if name not in modules:
            raise CheckpointError(f"{where}: target module {name} is not in this {config.family} model: is the "
                                  "adapter for another base model?")
        module = BottleneckAdapter(modules[name], size, act)
        for leaf, param in module.named_parameters():
            if leaf.startswith("base_layer."):
                continue
            key = f"{PREFIX}{name}.{leaf}"
            if key not in tensors or tensors[key].shape != param.shape:
                raise CheckpointError(f"{where}: tensor {key} is missing or not of shape {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(tensors[key])
        set_module(model, name, module)
    return model


__all__ = ["METHOD_TYPES", "PROMPT_TYPES", "adapter_kind", "check_tensors_match", "load_method_adapter",
           "method_tensors", "saved_rows"]
