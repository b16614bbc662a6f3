"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights before W8A8 quantization.

Per input channel j of each producer -> consumers group (lmstack.quant.scaling):
s_j = max|X_j|^alpha / max_i max|W_i[:, j]|^(1 - alpha), alpha = 0.5 by default, folded into the
producer. Activations are then easier to quantize per token, weights slightly harder per channel;
the int8 layers themselves are `Int8DynamicLinear`.
"""

from __future__ import annotations

import torch
from torch import nn

from lmstack.quant.calibration import BlockWalk, record_inputs
from lmstack.quant.scaling import fold_scales, scale_groups


def smoothing_factors(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s (K,) from the activations' per-channel max |x| (K,) and the consumers' weights (N_i, K)."""
    w_max = torch.stack([w.detach().abs().amax(0) for w in weights]).amax(0)  # (K,)
    s = act_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


@torch.no_grad()
def smooth_model(model: nn.Module, tokens: torch.Tensor, alpha: float = 0.5, batch_size: int = 8) -> None:
    """Fold SmoothQuant's factors into every block of `model` (in place; the fp model's outputs do not change)."""
    walk = BlockWalk(model, tokens, batch_size)

    def process(index: int, prefix: str, block: nn.Module) -> None:
        groups = scale_groups(block)
        names = [g.consumers[0] for g in groups]
        act_max: dict[str, torch.Tensor] = {}

        def observe(name: str, x: torch.Tensor) -> None:
            m = x.reshape(-1, x.shape[-1]).abs().amax(0)
            act_max[name] = m if name not in act_max else torch.maximum(act_max[name], m)

        record_inputs(block, walk, names, observe)
        modules = dict(block.named_modules())
        for group, name in zip(groups, names):
            s = smoothing_factors(act_max[name], [modules[c].weight for c in group.consumers], alpha)
            fold_scales(block, group, s)

    walk.walk(process)


__all__ = ["smooth_model", "smoothing_factors"]
