"""Put adapters into a model by module name, and take them out again.

    apply_ia3, apply_bottleneck     the same for IA3 vectors and bottleneck adapters (lmstack.adapters.ia3, .bottleneck)
    apply_lora(model, LoraConfig)   swap the target linears for LoraLinear, wrap modules_to_save and the
                                    trainable token rows, freeze everything else -> the adapted names
    merge_adapters / unmerge_adapters   fold the updates into the base weights and back (fp32: exact to rounding)
    unload(model)                   merged plain modules in place of every wrapper: an ordinary Transformer
    disable_adapters(model)         a context in which the model is its base (no second copy needed for a
                                    reference model, e.g. DPO's or PPO's KL term)
    is_adapter_parameter(name)      whether a parameter belongs to an adapter (what trains, what a checkpoint holds)

The model is never subclassed: only its leaf modules change (DESIGN.md, principle 3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from lmstack.adapters.bottleneck import PLACES, BottleneckAdapter, BottleneckConfig
from lmstack.adapters.config import LoraConfig
from lmstack.adapters.ia3 import IA3Config, IA3Linear
from lmstack.adapters.lora import LoraLinear
from lmstack.adapters.modules import ModulesToSave, TrainableTokens
from lmstack.adapters.names import hf_module
from lmstack.adapters.prompt import KVPrefix
from lmstack.errors import ConfigError

ADAPTER_LEAVES = ("lora_A", "lora_B", "lora_magnitude_vector", "modules_to_save", "trainable_tokens_delta", "ia3_l",
                  "adapter_down", "adapter_up", "kv_prefix")
WRAPPERS = (LoraLinear, ModulesToSave, TrainableTokens, IA3Linear, BottleneckAdapter, KVPrefix)


def is_adapter_parameter(name: str) -> bool:
    return any(part in ADAPTER_LEAVES for part in name.split("."))


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear, or a quantized linear (in_features, out_features and a dequantize())."""
    return isinstance(module, nn.Linear) or (hasattr(module, "dequantize") and hasattr(module, "in_features"))


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer an adapter may target: not the output head (peft's all-linear leaves it out too),
    not one already inside an adapter."""
    found = {}
    for name, module in model.named_modules():
        if name == "lm_head" or not is_linear(module) or any(isinstance(p, WRAPPERS) for p in _parents(model, name)):
            continue
        found[name] = module
    return found


def _parents(model: nn.Module, name: str) -> list[nn.Module]:
    parts = name.split(".")
    return [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Adapt `model` in place per `cfg`; returns the names of the linears that got a LoRA (or DoRA) update.

    Raises ConfigError when target_modules or modules_to_save match nothing (naming what the model has)."""
    config = model.config
    candidates = linear_modules(model)
    targets = []
    for name, module in candidates.items():
        names = [name, hf_module(name, config)[0]]
        if cfg.matches(names):
            r, alpha = cfg.rank_and_alpha(names)
            set_module(model, name, LoraLinear(module, r, alpha, cfg.lora_dropout, cfg.use_rslora, cfg.use_dora))
            targets.append(name)
    if not targets:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates} | {hf_module(n, config)[0].rsplit(".", 1)[-1]
                                                                     for n in candidates})
        raise ConfigError(f"lora.target_modules {cfg.target_modules!r} matches no linear layer of this model; "
                          f"its linear layers are named {', '.join(leaves)} (or use all-linear)")
    for entry in cfg.modules_to_save:
        wrap_modules_to_save(model, entry)
    if cfg.trainable_token_indices:
        wrap_trainable_tokens(model, cfg.trainable_token_indices)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_parameter(name))
    return targets


def wrap_modules_to_save(model: nn.Module, entry: str) -> list[str]:
    """Wrap every module named `entry` (a name or a dotted suffix, lmstack's or Hugging Face's) in ModulesToSave."""
    config = model.config
    found = [name for name, module in model.named_modules()
             if name and not isinstance(module, WRAPPERS) and not any(isinstance(p, WRAPPERS) for p in _parents(model, name))
             and any(n == entry or n.endswith("." + entry) for n in (name, hf_module(name, config)[0]))]
    if not found:
        raise ConfigError(f"lora.modules_to_save: {entry!r} names no module of this model "
                          "(e.g. lm_head, embed_tokens, model.norm)")
    for name in found:
        set_module(model, name, ModulesToSave(model.get_submodule(name)))
    return found


def wrap_trainable_tokens(model: nn.Module, indices: list[int]) -> None:
    """Train only rows `indices` of the embedding (and of the head: the same rows, shared when tied)."""
    vocab = model.model.embed_tokens.num_embeddings
    bad = [i for i in indices if not 0 <= i < vocab]
    if bad:
        raise ConfigError(f"lora.trainable_token_indices: {bad[0]} is outside the vocabulary (size {vocab})")
    embed = TrainableTokens(model.model.embed_tokens, indices)
    model.model.embed_tokens = embed
    shared = embed.trainable_tokens_delta if model.config.tie_word_embeddings else None
    model.lm_head = TrainableTokens(model.lm_head, indices, shared)


def train_new_rows(model: nn.Module, ids: list[int], *, head_only: bool = False) -> None:
    """Make the rows of tokens a run added (mean-initialised by resize_vocab) train beside a method that trains no
    rows (IA3, bottleneck, prompt / P- / prefix tuning): without this, two new tokens keep equal rows, so a tied
    model gives them equal logits and can never emit the higher id (ChatML's <|im_end|>: it never stops).

    head_only: only the head's rows (its own delta, even when tied), for prompt and P-tuning, whose peft forward
    embeds the input with the base embedding, so trained input rows could not be carried to peft."""
    if head_only:
        model.lm_head = TrainableTokens(model.lm_head, ids)
    else:
        wrap_trainable_tokens(model, ids)


def _listed(names: list[str], entries: list[str]) -> bool:
    return any(n == e or n.endswith("." + e) for n in names for e in entries)


def apply_ia3(model: nn.Module, cfg: IA3Config) -> list[str]:
    """Swap the target linears for IA3Linear, freeze everything else -> the adapted module names."""
    config = model.config
    targets, ff = cfg.resolved(config.family)
    adapted = []
    for name, module in linear_modules(model).items():
        names = [name, hf_module(name, config)[0]]
        if _listed(names, cfg.exclude_modules) or not _listed(names, targets):
            continue
        set_module(model, name, IA3Linear(module, feedforward=_listed(names, ff)))
        adapted.append(name)
    if not adapted:
        raise ConfigError(f"ia3.target_modules {targets} match no linear layer of this model "
                          "(e.g. k_proj, v_proj, down_proj)")
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(".ia3_l"))
    return adapted


def bottleneck_targets(model: nn.Module, placement: str) -> list[str]:
    return [f"model.layers.{i}.{leaf}" for i in range(len(model.model.layers)) for leaf in PLACES[placement]]


def apply_bottleneck(model: nn.Module, cfg: BottleneckConfig) -> list[str]:
    """Wrap the placement's output projections in BottleneckAdapter; freeze everything else -> their names."""
    size = cfg.size(model.config.hidden_size)
    names = bottleneck_targets(model, cfg.placement)
    for name in names:
        set_module(model, name, BottleneckAdapter(model.get_submodule(name), size, cfg.non_linearity))
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        param.requires_grad_(".adapter_down." in name or ".adapter_up." in name)
    return names


def adapters(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every adapter wrapper in the model."""
    for name, module in model.named_modules():
        if isinstance(module, WRAPPERS):
            yield name, module


def has_adapters(model: nn.Module) -> bool:
    return next(adapters(model), None) is not None


def merge_adapters(model: nn.Module) -> None:
    for _, module in adapters(model):
        if isinstance(module, LoraLinear):
            module.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for _, module in adapters(model):
        if isinstance(module, LoraLinear):
            module.unmerge()


def unload(model: nn.Module) -> nn.Module:
    """Replace every wrapper by a plain module with the adapter folded in (LoRA and IA3 merged, trained rows and
    modules written in): the model is then an ordinary Transformer that `save_model` writes as is. Bottleneck
    adapters and prompt / prefix tuning have nothing to fold into: they stay (frozen)."""
    for name, module in list(adapters(model)):
        if isinstance(module, LoraLinear):
            set_module(model, name, module.merged_linear())
        elif isinstance(module, ModulesToSave):
            set_module(model, name, module.modules_to_save)
        elif isinstance(module, TrainableTokens):
            set_module(model, name, module.merged_layer())
        elif isinstance(module, IA3Linear):
            set_module(model, name, module.merged_linear())
        # bottleneck adapters and a kv_prefix (prompt / prefix tuning) cannot be folded into weights: they stay
    lm = getattr(model, model.backbone_name) if hasattr(model, "backbone_name") else model  # score / value heads
    head = getattr(lm, "lm_head", None)  # a reward model's backbone has none (nn.Identity)
    untied = isinstance(head, nn.Linear) and head.weight is not lm.model.embed_tokens.weight
    if lm.config.tie_word_embeddings and untied:
        lm.config.tie_word_embeddings = False  # e.g. modules_to_save trained a copy of one side only
    for param in model.parameters():
        param.requires_grad_(False)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes its base outputs (adapters bypassed, nothing copied)."""
    wrappers = [m for _, m in adapters(model)]
    if any(isinstance(m, LoraLinear) and m.merged for m in wrappers):
        raise ConfigError("cannot disable merged adapters; unmerge_adapters(model) first")
    previous = [m.enabled for m in wrappers]
    for m in wrappers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(wrappers, previous):
            m.enabled = was


__all__ = ["adapters", "apply_bottleneck", "apply_ia3", "apply_lora", "bottleneck_targets", "disable_adapters", "has_adapters", "is_adapter_parameter", "linear_modules",
           "merge_adapters", "set_module", "train_new_rows", "unload", "unmerge_adapters", "wrap_modules_to_save",
           "wrap_trainable_tokens"]
