"""Log-probabilities of completion tokens under a causal LM: what every alignment objective scores.

A sequence's log-probability is the SUM of log p(token) over its completion tokens (the targets that are
not IGNORE_INDEX), never a mean: DPO, IPO, KTO and PPO are defined on sums; SimPO, ORPO and IPO's length
normalisation divide by the token count themselves.

Shapes: B rows, T tokens, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from lmstack.model.heads import target_logprobs
from lmstack.train.objectives.lm import IGNORE_INDEX


def _needs_forward(model: nn.Module) -> bool:
    """A DDP or FSDP2 wrapper only syncs gradients (and gathers weights) through its forward."""
    return isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "set_requires_gradient_sync")


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) ids, mask and next-token targets -> (log p(target) (B, T) fp32, entropy (B, T) or None); 0 where
    the target is IGNORE_INDEX.

    A plain model runs its trunk and then its head only at the scored positions; a distributed wrapper is
    called through its forward (full logits), which is what keeps its gradient all-reduce correct.
    """
    if _needs_forward(model):
        logits = model(input_ids, attention_mask=attention_mask)  # (B, T, V)
        return target_logprobs(lambda x: x, logits, targets, with_entropy, IGNORE_INDEX)
    hidden = model.hidden_states(input_ids, attention_mask)  # (B, T, d)
    return target_logprobs(model.head, hidden, targets, with_entropy, IGNORE_INDEX)


def completion_lengths(targets: torch.Tensor) -> torch.Tensor:
    """(B, T) targets -> (B,) number of scored (completion) tokens per row."""
    return (targets != IGNORE_INDEX).sum(-1)


def sequence_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) summed completion log-probabilities of a batch with input_ids / attention_mask / targets."""
    logp, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["targets"])
    return logp.sum(-1)


__all__ = ["completion_lengths", "sequence_logprobs", "token_logprobs"]
