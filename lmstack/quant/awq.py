"""AWQ (Lin et al. 2023): activation-aware per-channel scales, then a clipping search, then round-to-nearest.

For each producer -> consumers group of a block (lmstack.quant.scaling), with X the consumers' input on
the calibration windows:
1. s = mean|X|^alpha per input channel, normalised by sqrt(max(s) min(s)); alpha on the grid
   0, 1/grid, ..., (grid-1)/grid is chosen to minimise the consumers' summed output error
   sum_i ||X W_i^T - (X / s) Q(W_i diag(s))^T||^2, then folded into the producer (the reference
   measures the error at a larger module's output, e.g. the whole attention for q/k/v; the
   consumers' own outputs are the same idea with less code).
2. Clipping: per (output row, group), the range max|w| * r with r in 1.0, 0.95, ..., 0.5 that minimises
   that group's share of the output error, ||X_g (w_g - Q(clip(w_g)))||^2. Skipped for q_proj and k_proj
   (their errors are amplified through the attention scores), as the reference does.
3. Each weight (scaled and clipped) is quantized to nearest with min-max groups.

The blocks are walked in order on full-precision activations (scaling and clipping are applied to the
float weights as the walk goes; the scales leave the float model's function unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

from lmstack.quant.calibration import BlockWalk, record_inputs
from lmstack.quant.formats import IntWeight, quantize_rtn
from lmstack.quant.scaling import fold_scales, scale_groups

MAX_TOKENS = 2048  # calibration tokens used per search (spread over the windows)


def _fake_quant(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    return quantize_rtn(w, bits, group_size).dequantize()


def search_scales(x: torch.Tensor, weights: list[torch.Tensor], bits: int, group_size: int | None,
                  grid: int = 20) -> tuple[torch.Tensor, float]:
    """x (n, K), weights [(N_i, K)] -> (best s (K,), its alpha)."""
    x_mean = x.abs().mean(0)  # (K,)
    reference = [x @ w.t() for w in weights]
    best = (float("inf"), torch.ones_like(x_mean), 0.0)
    for step in range(grid):
        alpha = step / grid
        s = x_mean.clamp(min=1e-4).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        error = 0.0
        for w, y in zip(weights, reference):
            w_hat = _fake_quant(w * s[None, :], bits, group_size) / s[None, :]
            error += float(((x @ w_hat.t()) - y).pow(2).sum())
        if error < best[0]:
            best = (error, s, alpha)
    return best[1], best[2]


def search_clip(x: torch.Tensor, w: torch.Tensor, bits: int, group_size: int | None,
                ratios: tuple[float, ...] = tuple(1 - 0.05 * i for i in range(11))) -> torch.Tensor:
    """x (n, K), w (N, K) -> w clipped per (row, group) at the ratio of max|w| that minimises the group's
    output error."""
    N, K = w.shape
    g = group_size or K
    xg = x.view(x.shape[0], K // g, g)  # (n, G, g)
    wg = w.view(N, K // g, g)  # (N, G, g)
    amax = wg.abs().amax(-1, keepdim=True)  # (N, G, 1)
    best_err = torch.full((N, K // g), float("inf"))
    best = wg.clone()
    for r in ratios:
        clipped = wg.clamp(-amax * r, amax * r)
        diff = wg - _fake_quant(clipped.view(N, K), bits, group_size).view(N, K // g, g)
        err = torch.einsum("ngk,ogk->nog", xg, diff).pow(2).sum(0)  # (N, G): each group's output error
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better[..., None], clipped, best)
    return best.view(N, K)


@torch.no_grad()
def awq_model(model: nn.Module, tokens: torch.Tensor, bits_for: dict[str, int], group_size: int | None,
              grid: int = 20, clip: bool = True, batch_size: int = 8) -> dict[str, IntWeight]:
    """AWQ every block linear named in `bits_for`; returns full name -> IntWeight (scales folded in place)."""
    walk = BlockWalk(model, tokens, batch_size)
    results: dict[str, IntWeight] = {}

    def process(index: int, prefix: str, block: nn.Module) -> None:
        modules = dict(block.named_modules())
        for group in scale_groups(block):
            consumers = [c for c in group.consumers if prefix + c in bits_for]
            if not consumers:
                continue
            bits = bits_for[prefix + consumers[0]]
            seen: list[torch.Tensor] = []
            record_inputs(block, walk, [consumers[0]], lambda _, x, out=seen: out.append(x.reshape(-1, x.shape[-1])))
            x = torch.cat(seen)
            x = x[torch.linspace(0, x.shape[0] - 1, min(MAX_TOKENS, x.shape[0])).long()]  # (n, K)
            s, _ = search_scales(x, [modules[c].weight for c in consumers], bits, group_size, grid)
            fold_scales(block, group, s)
            x = x / s[None, :]
            for c in consumers:
                w = modules[c].weight
                if clip and not c.endswith(("q_proj", "k_proj")):
                    w.copy_(search_clip(x, w, bits_for[prefix + c], group_size))
        for name in modules:
            if prefix + name in bits_for:
                results[prefix + name] = quantize_rtn(modules[name].weight, bits_for[prefix + name], group_size)

    walk.walk(process)
    return results


__all__ = ["awq_model", "search_clip", "search_scales"]
