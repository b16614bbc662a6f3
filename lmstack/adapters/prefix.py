"""Prefix tuning (Li & Liang 2021, peft's PrefixEncoder): trained keys and values in front of every layer.

    PrefixTuningConfig / apply_prefix_tuning

The prefix is a table (P, L * 2 * H_kv * D): row p holds virtual token p's key and value in every layer. With
`prefix_projection` (the paper's reparameterisation, for stabler training) the table is the output of an MLP
(P, H_kv * D) -> tanh -> (P, L * 2 * H_kv * D) over P trained embeddings; peft then saves only the MLP's
output, the table, and so does lmstack (`prompt_embeddings`). The keys are used as they are (no RoPE is
applied to them; peft hands them to the model as a past-key-value cache) and the tokens' positions start
at P. The model reads them through `kv_prefix` (lmstack.model.transformer), in training and while decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmstack.adapters.prompt import KVList, KVPrefix, _check_fits, _freeze_all_but_prefix
from lmstack.errors import ConfigError


@dataclass
class PrefixTuningConfig:
    """num_virtual_tokens: P prefix slots per layer. prefix_projection: train through the MLP (encoder_hidden_size wide)."""

    num_virtual_tokens: int = 20
    prefix_projection: bool = True
    encoder_hidden_size: int = 256

    def __post_init__(self) -> None:
        if self.num_virtual_tokens <= 0 or self.encoder_hidden_size <= 0:
            raise ConfigError("prefix_tuning.num_virtual_tokens and encoder_hidden_size must be positive")


class PrefixTuning(KVPrefix):
    """The (P, L*2*H_kv*D) table (or its MLP) -> per layer (k, v), each (1, H_kv, P, D)."""

    peft_type = "PREFIX_TUNING"

    def __init__(self, P: int, layers: int, kv_heads: int, head_dim: int, projection_hidden: int | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__(P)
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        token_dim = kv_heads * head_dim
        kw = {"device": device, "dtype": dtype}
        if projection_hidden is not None:
            self.embedding = nn.Embedding(P, token_dim, **kw)
            self.transform = nn.Sequential(nn.Linear(token_dim, projection_hidden, **kw), nn.Tanh(),
                                           nn.Linear(projection_hidden, layers * 2 * token_dim, **kw))
        else:
            self.embedding = nn.Embedding(P, layers * 2 * token_dim, **kw)
            self.transform = None

    def depends_on_model(self) -> bool:
        return False

    def prompt_embeddings(self) -> torch.Tensor:
        table = self.embedding.weight
        return table if self.transform is None else self.transform(table)  # (P, L * 2 * H_kv * D)

    def compute(self, model: nn.Module) -> KVList:
        P, L, H, D = self.num_virtual_tokens, self.layers, self.kv_heads, self.head_dim
        kv = self.prompt_embeddings().view(P, L * 2, H, D).permute(1, 2, 0, 3)  # (2L, H_kv, P, D): peft's order
        return [(kv[2 * i][None], kv[2 * i + 1][None]) for i in range(L)]  # per layer (1, H_kv, P, D) each


def apply_prefix_tuning(model: nn.Module, cfg: PrefixTuningConfig) -> PrefixTuning:
    """Give `model` a trainable prefix of P keys/values in every layer (everything else frozen)."""
    _check_fits(model, cfg.num_virtual_tokens, "prefix_tuning")
    c, weight = model.config, model.model.embed_tokens.weight
    module = PrefixTuning(cfg.num_virtual_tokens, c.num_layers, c.num_kv_heads, c.head_dim,
                          cfg.encoder_hidden_size if cfg.prefix_projection else None, weight.device, weight.dtype)
    module.peft_fields = {"prefix_projection": cfg.prefix_projection, "encoder_hidden_size": cfg.encoder_hidden_size}
    _freeze_all_but_prefix(model, module)
    return module


__all__ = ["PrefixTuning", "PrefixTuningConfig", "apply_prefix_tuning"]
