"""Heads on a transformer's hidden states: a scalar score (reward model) and a per-token value (PPO).

    ScoreModel(backbone)       reward model: one score per sequence, read at its last real token; the same
                               module tree as Hugging Face's *ForSequenceClassification (body + `score`, no LM
                               head), so lmstack.interop.hf_heads writes a directory transformers loads as is
    ValueHeadModel(policy)     a policy with a value head on the same trunk (trl v0's
                               AutoModelForCausalLMWithValueHead): log-probabilities and values in one forward
    target_logprobs(...)       log p(target) (and the entropy) at the positions that have a target, computing
                               the head only there: a (N, V) matrix for N completion tokens, not (B, T, V)

Neither subclasses the Transformer: each wraps one and calls its `hidden_states` / `head` (the CausalLM
protocol). Shapes: B batch, T tokens, d width, V vocabulary, N scored positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmstack.config import ModelConfig

IGNORE_INDEX = -100


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) index of each row's last real token (the rightmost 1; works for either padding side)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(dim=-1)


def target_logprobs(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
                    with_entropy: bool = False, ignore_index: int = IGNORE_INDEX
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets) under softmax(head(hidden)) where targets != ignore_index, 0 elsewhere.

    hidden (B, T, d), targets (B, T) -> (logp (B, T), entropy (B, T) or None), at least fp32. Only the
    N scored positions go through the head; the log-softmax is taken in fp32 (fp64 for an fp64 model).
    """
    keep = targets != ignore_index  # (B, T)
    logits = head(hidden[keep])  # (N, V)
    dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16 -> fp32; fp64 stays fp64
    logits = logits.to(dtype)
    log_z = torch.logsumexp(logits, dim=-1)  # (N,)
    picked = logits.gather(1, targets[keep][:, None]).squeeze(1) - log_z  # (N,)
    logp = torch.zeros(targets.shape, dtype=dtype, device=hidden.device)
    logp = logp.masked_scatter(keep, picked)
    if not with_entropy:
        return logp, None
    probs = torch.exp(logits - log_z[:, None])  # (N, V)
    token_entropy = log_z - (probs * logits).sum(-1)  # H = log Z - E_p[logit]
    entropy = torch.zeros(targets.shape, dtype=dtype, device=hidden.device)
    return logp, entropy.masked_scatter(keep, token_entropy)


class _Wrapper(nn.Module):
    """What the engine and the recipes read through to the wrapped transformer (config, checkpointing)."""

    backbone_name = "backbone"

    @property
    def config(self) -> ModelConfig:
        return getattr(self, self.backbone_name).config

    @property
    def gradient_checkpointing(self) -> bool:
        return getattr(self, self.backbone_name).gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        getattr(self, self.backbone_name).gradient_checkpointing = value


class ScoreModel(_Wrapper):
    """A reward model: `model(input_ids, attention_mask)` (B, T) -> scores (B,) fp32, one per sequence.

    The score is `score(h)` of the final hidden state h at each row's last real token, as in transformers'
    *ForSequenceClassification with num_labels=1. The backbone's LM head is dropped (a reward model has none).
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        backbone.lm_head = nn.Identity()  # no vocabulary projection: the score head replaces it
        self.backbone = backbone
        self.score = nn.Linear(backbone.config.hidden_size, 1, bias=False)
        if not self.score.weight.is_meta:
            nn.init.normal_(self.score.weight, std=backbone.config.init_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.backbone.hidden_states(input_ids, attention_mask)  # (B, T, d)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_index(attention_mask)]  # (B, d)
        return self.score(last).squeeze(-1).float()  # (B,)


class ValueHeadModel(_Wrapper):
    """A policy and a value head sharing one trunk (PPO).

    `model(input_ids, attention_mask, targets)` -> (logp (B, T), entropy (B, T), values (B, T)): the
    log-probability and entropy of each target token (0 where there is none) and the value of the state
    before it, V(s_t) read from the hidden state at position t, the position that predicts targets[:, t].
    `policy` is the plain transformer (what generation samples from and what the checkpoint publishes).
    """

    backbone_name = "policy"

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        if not self.value_head.weight.is_meta:
            nn.init.normal_(self.value_head.weight, std=policy.config.init_std)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
                with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        hidden = self.policy.hidden_states(input_ids, attention_mask)  # (B, T, d)
        logp, entropy = target_logprobs(self.policy.head, hidden, targets, with_entropy)
        values = self.value_head(hidden).squeeze(-1).float()  # (B, T)
        return logp, entropy, values


__all__ = ["ScoreModel", "ValueHeadModel", "last_token_index", "target_logprobs"]
