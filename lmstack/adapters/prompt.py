"""Prompt tuning and P-tuning: P trained virtual tokens in front of every input, as peft defines them.

    PromptTuningConfig / apply_prompt_tuning   P embeddings trained directly (Lester et al. 2021); initialised
                                               randomly or from a text's token embeddings
    PTuningConfig / apply_p_tuning             P embeddings produced by a small prompt encoder, an MLP or a
                                               bidirectional LSTM + MLP (Liu et al. 2021, peft's PromptEncoder)

How they enter the model: peft concatenates the virtual embeddings before the input embeddings. In a causal
model the virtual tokens see only each other, so their keys and values in every layer depend on nothing the
user types: lmstack runs the model once on the virtual tokens (`virtual_token_kv`) and installs the result
as the model's `kv_prefix`, which every attention layer reads before its own keys (lmstack.model.transformer).
The logits are the same as peft's for the real tokens (positions start at P), training, evaluation and every
decoding strategy work unchanged, and in eval mode without gradients the prefix is computed once and reused
until a parameter changes.

Saved as peft does (`adapter_config.json` + one tensor `prompt_embeddings`, (P, d): for P-tuning the encoder's
output, which is what peft stores and loads in inference mode). Training state beyond that (the encoder) is
kept by the engine's checkpoints in `lmstack_adapter_state.safetensors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lmstack.errors import ConfigError

KVList = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PromptTuningConfig:
    """num_virtual_tokens: P. init: "random" (normal, with the std of the model's embedding rows) or "text"
    (the token embeddings of `init_text`, repeated or cut to P tokens, as peft's prompt_tuning_init="TEXT")."""

    num_virtual_tokens: int = 20
    init: Literal["random", "text"] = "random"
    init_text: str | None = None

    def __post_init__(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise ConfigError(f"prompt_tuning.num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.init == "text" and not self.init_text:
            raise ConfigError("prompt_tuning.init is text but prompt_tuning.init_text is empty")


@dataclass
class PTuningConfig:
    """P-tuning's prompt encoder (peft's PromptEncoderConfig): encoder_reparameterization_type MLP (three linears,
    ReLU between) or LSTM (bidirectional, then a two-layer MLP); encoder_hidden_size its width."""

    num_virtual_tokens: int = 20
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: int = 128
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.num_virtual_tokens <= 0 or self.encoder_hidden_size <= 0:
            raise ConfigError("p_tuning.num_virtual_tokens and encoder_hidden_size must be positive")


class KVPrefix(nn.Module):
    """What `model.kv_prefix` holds: `forward(model)` -> per layer (k, v), each (1, H_kv, P, D).

    `peft_fields` are the adapter_config.json fields it is saved with."""

    peft_type = ""

    def __init__(self, num_virtual_tokens: int):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.peft_fields: dict = {}
        self._memo: tuple[tuple, KVList] | None = None
        self.enabled = True  # False: no virtual tokens (disable_adapters)

    def compute(self, model: nn.Module) -> KVList:
        raise NotImplementedError

    def depends_on_model(self) -> bool:
        return True

    def forward(self, model: nn.Module) -> KVList | None:
        if not self.enabled:
            return None
        if self.training or torch.is_grad_enabled():
            self._memo = None
            return self.compute(model)
        if torch.compiler.is_compiling():
            # A compiled decode step freezes the weights into constants, so inductor folds this computation
            # into constants too; the memo's key (parameter versions) is not something a graph can guard on.
            return self.compute(model)
        # Inference: the prefix changes only when a weight does (a decode step must not rerun P tokens).
        params = model.parameters() if self.depends_on_model() else self.parameters()
        key = (tuple((id(p), p._version, p.device, p.dtype) for p in params),
               torch.is_autocast_enabled("cuda"), torch.is_autocast_enabled("cpu"))
        if self._memo is None or self._memo[0] != key:
            self._memo = (key, self.compute(model))
        return self._memo[1]

    def prompt_embeddings(self) -> torch.Tensor:
        """The tensor peft saves as `prompt_embeddings`."""
        raise NotImplementedError


def virtual_token_kv(model: nn.Module, embeds: torch.Tensor) -> KVList:
    """Run the base model on P virtual token embeddings (P, d) at positions 0..P-1 -> each layer's keys and
    values (1, H_kv, P, D), differentiable in `embeds` (written into a temporary P-slot cache)."""
    P = embeds.shape[0]
    caches = model.make_cache(1, P, device=embeds.device)
    saved = model.kv_caches()
    model.use_caches(caches)
    try:
        model.hidden_states(None, cache_slots=torch.arange(P, device=embeds.device), inputs_embeds=embeds[None])
    finally:
        model.use_caches(saved)
    return [(c.k, c.v) for c in caches]


class PromptTuning(KVPrefix):
    """P trained embeddings (P, d) -> the virtual tokens' keys/values (peft: PromptEmbedding, PROMPT_TUNING)."""

    peft_type = "PROMPT_TUNING"

    def __init__(self, init: torch.Tensor):
        super().__init__(init.shape[0])
        self.embedding = nn.Embedding(*init.shape, device=init.device, dtype=init.dtype)
        with torch.no_grad():
            self.embedding.weight.copy_(init)

    def prompt_embeddings(self) -> torch.Tensor:
        return self.embedding.weight

    def compute(self, model: nn.Module) -> KVList:
        return virtual_token_kv(model, self.prompt_embeddings())


class PromptEncoder(KVPrefix):
    """P-tuning: embeddings (P, d) through an MLP (or LSTM + MLP), with peft's PromptEncoder layout and names."""

    peft_type = "P_TUNING"

    def __init__(self, cfg: PTuningConfig, d: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__(cfg.num_virtual_tokens)
        h = cfg.encoder_hidden_size
        kw = {"device": device, "dtype": dtype}
        self.kind = cfg.encoder_reparameterization_type
        self.embedding = nn.Embedding(cfg.num_virtual_tokens, d, **kw)
        if self.kind == "LSTM":
            self.lstm_head = nn.LSTM(d, h, num_layers=cfg.encoder_num_layers, dropout=cfg.encoder_dropout,
                                     bidirectional=True, batch_first=True, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, **kw), nn.ReLU(), nn.Linear(2 * h, d, **kw))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h, **kw), nn.ReLU(), nn.Linear(h, h, **kw), nn.ReLU(),
                                          nn.Linear(h, d, **kw))

    def prompt_embeddings(self) -> torch.Tensor:
        x = self.embedding.weight[None]  # (1, P, d)
        if self.kind == "LSTM":
            x = self.lstm_head(x)[0]  # (1, P, 2h)
        return self.mlp_head(x)[0]  # (P, d)

    def compute(self, model: nn.Module) -> KVList:
        return virtual_token_kv(model, self.prompt_embeddings())


def _check_fits(model: nn.Module, P: int, what: str) -> None:
    if P >= model.config.max_seq_len:
        raise ConfigError(f"{what}.num_virtual_tokens = {P} leaves no room in the model's context of "
                          f"{model.config.max_seq_len} tokens; use fewer virtual tokens")


def _freeze_all_but_prefix(model: nn.Module, prefix: KVPrefix) -> None:
    if getattr(model, "kv_prefix", None) is not None:
        raise ConfigError("the model already has a prompt / prefix adapter; apply one per model")
    model.requires_grad_(False)
    model.kv_prefix = prefix.requires_grad_(True)


def apply_prompt_tuning(model: nn.Module, cfg: PromptTuningConfig, tokenizer=None) -> PromptTuning:
    """Give `model` P trainable virtual tokens (everything else frozen). `tokenizer` encodes init_text."""
    P = cfg.num_virtual_tokens
    _check_fits(model, P, "prompt_tuning")
    table = model.model.embed_tokens.weight.detach()
    if cfg.init == "text":
        if tokenizer is None:
            raise ConfigError("prompt_tuning.init = text needs the tokenizer to encode init_text")
        ids = list(tokenizer.encode(cfg.init_text))
        if not ids:
            raise ConfigError(f"prompt_tuning.init_text {cfg.init_text!r} encodes to no tokens")
        ids = (ids * math.ceil(P / len(ids)))[:P]  # peft: repeat the text's tokens, then cut to P
        init = table[torch.tensor(ids, device=table.device)].clone()
    else:
        g = torch.Generator(device="cpu").manual_seed(torch.initial_seed() % 2**63)
        init = (torch.randn(P, table.shape[1], generator=g) * table.float().std()).to(table)
    module = PromptTuning(init)
    module.peft_fields = {"prompt_tuning_init": "TEXT" if cfg.init == "text" else "RANDOM",
                          "prompt_tuning_init_text": cfg.init_text}
    _freeze_all_but_prefix(model, module)
    return module


def apply_p_tuning(model: nn.Module, cfg: PTuningConfig) -> PromptEncoder:
    _check_fits(model, cfg.num_virtual_tokens, "p_tuning")
    weight = model.model.embed_tokens.weight
    module = PromptEncoder(cfg, weight.shape[1], weight.device, weight.dtype)
    module.peft_fields = {"encoder_reparameterization_type": cfg.encoder_reparameterization_type,
                          "encoder_hidden_size": cfg.encoder_hidden_size, "encoder_num_layers": cfg.encoder_num_layers,
                          "encoder_dropout": cfg.encoder_dropout}
    _freeze_all_but_prefix(model, module)
    return module


__all__ = ["KVPrefix", "PTuningConfig", "PromptEncoder", "PromptTuning", "PromptTuningConfig", "apply_p_tuning",
           "apply_prompt_tuning", "virtual_token_kv"]
