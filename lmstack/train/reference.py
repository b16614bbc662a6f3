"""The reference policy of DPO, KTO, PPO and GRPO: the model the KL term and the implicit rewards measure from.

One interface, `reference.token_logprobs(policy, input_ids, attention_mask, targets) -> (B, T)`, so the
objectives do not care where the reference comes from:

    FrozenReference(model)    a frozen copy of the starting policy (full fine-tuning), or any other model
                              (`align.reference: DIR`); moved to the batch's device on first use
    AdapterDisabledReference  a LoRA policy's reference: the policy itself with its adapters switched off for
                              the call (lmstack.adapters.disable_adapters); no second copy of the weights
    cached_reference_logps    sequence log-probabilities of a fixed pair set computed once and kept on disk
                              (DPO's precompute option): the reference then never runs during training
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from lmstack.adapters import disable_adapters, has_adapters
from lmstack.atomic import atomic_file
from lmstack.errors import ConfigError
from lmstack.model.protocol import unwrap
from lmstack.train.objectives.logprobs import token_logprobs


class Reference(Protocol):
    def token_logprobs(self, policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       targets: torch.Tensor) -> torch.Tensor:
        """(B, T) log p_ref(target), 0 where there is no target; no gradient."""
        ...


class FrozenReference:
    """A frozen, eval-mode copy of a model (by default the policy as training starts)."""

    def __init__(self, model: nn.Module, copy_model: bool = True):
        model = unwrap(model)
        self.model = copy.deepcopy(model) if copy_model else model
        self.model.eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def token_logprobs(self, policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       targets: torch.Tensor) -> torch.Tensor:
        weight = next(self.model.parameters())
        if weight.device != input_ids.device:
            self.model.to(input_ids.device)
        return token_logprobs(self.model, input_ids, attention_mask, targets)[0]


class AdapterDisabledReference:
    """The reference of a policy trained through adapters (LoRA, DoRA): the same module with its adapters
    bypassed, i.e. the starting weights, which the adapters never change. Evaluated in eval mode (no dropout)
    and without gradient, then the policy's mode is restored."""

    @torch.no_grad()
    def token_logprobs(self, policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       targets: torch.Tensor) -> torch.Tensor:
        model = unwrap(policy) if policy is not None else None
        if model is None or not has_adapters(model):
            raise ConfigError("the adapter-disabled reference needs the policy, with its adapters (set `lora:`)")
        was_training = model.training
        model.eval()
        try:
            with disable_adapters(model):
                return token_logprobs(model, input_ids, attention_mask, targets)[0]
        finally:
            model.train(was_training)


# ------------------------------------------------------------------------------------------- cached on disk
def fingerprint(rows: Sequence[Any], reference_id: str) -> str:
    """SHA-256 over the examples' token ids and the reference's identity: a cache is valid only for both."""
    h = hashlib.sha256(reference_id.encode())
    for row in rows:
        h.update(json.dumps([row.prompt, getattr(row, "chosen", None), getattr(row, "rejected", None),
                             getattr(row, "completion", None)]).encode())
    return h.hexdigest()


def reference_identity(path: str | Path | None) -> str:
    """The reference model's directory with its weight files' sizes and modification times."""
    if path is None:
        return "policy-at-start"
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    return json.dumps([str(path.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files])


@torch.no_grad()
def compute_sequence_logps(reference: Reference, batches: Sequence[dict[str, torch.Tensor]],
                           device: torch.device, policy: nn.Module | None = None) -> torch.Tensor:
    """(N, R) summed reference log-probabilities: row i of batch k is sequence i of that batch; the batches
    hold the examples in index order (R = rows per example: 2 for pairs, 1 for unpaired, +1 for KTO's KL row).
    `policy`: the model an AdapterDisabledReference reads (on `device`)."""
    out = []
    for batch in batches:
        ids, mask, targets = (batch[k].to(device) for k in ("input_ids", "attention_mask", "targets"))
        seq = reference.token_logprobs(policy, ids, mask, targets).sum(-1)  # (rows,)
        B = batch["index"].shape[0]
        columns = [seq[i * B:(i + 1) * B] for i in range(ids.shape[0] // B)]
        if "kl_input_ids" in batch:
            kl = [batch[f"kl_{k}"].to(device) for k in ("input_ids", "attention_mask", "targets")]
            columns.append(reference.token_logprobs(policy, *kl).sum(-1))
        out.append(torch.stack(columns, dim=1).cpu())  # (B, R)
    return torch.cat(out)


def cached_reference_logps(path: str | Path, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The (N, R) reference log-probabilities stored in the safetensors file `path` under fingerprint `key`,
    computed (and written atomically) when the file is absent or holds another fingerprint."""
    path = Path(path)
    if path.exists():
        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") == key:
                return load_file(path)["logps"]
    logps = compute()
    with atomic_file(path, "wb") as f:
        f.write(save({"logps": logps.contiguous()}, metadata={"fingerprint": key}))
    return logps


__all__ = ["AdapterDisabledReference", "FrozenReference", "Reference", "cached_reference_logps", "compute_sequence_logps", "fingerprint",
           "reference_identity"]
