"""IA3 (Liu et al. 2022, peft's IA3): learned vectors that rescale keys, values and the MLP's intermediate activation.

    IA3Config, IA3Linear (lmstack.adapters.inject.apply_ia3 puts them in)

A target linear's output is multiplied by a vector l (out,), or, for a feed-forward module (the MLP's output
projection), its input is: y = W (l * x). The vectors start at one, so training starts from the base model.
peft's shapes and names are kept: `ia3_l` is (out, 1), or (1, in) for a feed-forward module, and the adapter
file holds `base_model.model.<module>.ia3_l`. GPT-2's fused c_attn gets one (3d, 1) vector in peft: lmstack's
q, k and v get its three thirds (peft's GPT-2 default adapts c_attn, so queries are scaled there too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lmstack.adapters.lora import dense_weight
from lmstack.model.linear import Linear

# peft's defaults (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_...): Llama-style and GPT-2
_DEFAULT_TARGETS = {"gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])}
_LLAMA_TARGETS = (["k_proj", "v_proj", "down_proj"], ["down_proj"])


@dataclass
class IA3Config:
    """target_modules / feedforward_modules: names (or dotted suffixes) as for LoRA, lmstack's or Hugging Face's;
    None = peft's default for the family. feedforward_modules must be among the targets."""

    target_modules: list[str] | None = None
    feedforward_modules: list[str] | None = None
    exclude_modules: list[str] = field(default_factory=list)

    def resolved(self, family: str) -> tuple[list[str], list[str]]:
        targets, ff = _DEFAULT_TARGETS.get(family, _LLAMA_TARGETS)
        return list(self.target_modules or targets), list(ff if self.feedforward_modules is None
                                                         else self.feedforward_modules)


class IA3Linear(nn.Module):
    """y = base(x) * l, or base(x * l) when `feedforward` (l is the input's scale then)."""

    def __init__(self, base_layer: nn.Module, feedforward: bool):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.feedforward = feedforward
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        weight = base_layer.weight if hasattr(base_layer, "weight") else None
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=weight.device if weight is not None else None))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base_layer(x)
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return self.base_layer((x * scale).to(x.dtype))
        y = self.base_layer(x)
        return (y * scale).to(y.dtype)

    def merged_linear(self) -> nn.Module:
        """A plain Linear computing the same function (fp32: exact to rounding)."""
        weight = dense_weight(self.base_layer).detach().float()
        bias = getattr(self.base_layer, "bias", None)
        scale = self.ia3_l.detach().float()
        merged = Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device)
        with torch.no_grad():
            merged.weight.copy_(weight * scale)  # (out, in) * (1, in) or (out, 1)
            if bias is not None:
                merged.bias.copy_(bias.float() if self.feedforward else bias.float() * scale.flatten())
        return merged


__all__ = ["IA3Config", "IA3Linear"]
