"""Mixed precision: bits per layer from a sensitivity scan, for a target average.

1. Scan: for each quantizable linear and each candidate width b, quantize that layer alone (round to
   nearest, in groups) and measure the calibration loss increase over the full-precision model:
   delta[layer][b] (nats per token).
2. Choose: start every layer at the narrowest width; while the parameter-weighted average stays within
   the target, give the next extra bits to the upgrade that removes the most loss per extra bit
   (a greedy knapsack: layers' losses are treated as adding up, which a scan of one layer at a time
   assumes).

The result feeds `QuantConfig.bits_per_layer` for RTN or GPTQ; `format_table` prints the scan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmstack.quant.calibration import mean_nll
from lmstack.quant.formats import quantize_rtn
from lmstack.quant.linear import target_linears


@dataclass
class LayerSensitivity:
    name: str
    parameters: int
    delta: dict[int, float]  # bits -> loss increase (nats / token) when only this layer is quantized
    bits: int = 0  # the chosen width


@torch.no_grad()
def sensitivity_scan(model: nn.Module, tokens: torch.Tensor, candidates: tuple[int, ...] = (3, 4, 8),
                     group_size: int | None = 128, batch_size: int = 8) -> list[LayerSensitivity]:
    """Loss increase for each (layer, bits), quantizing one layer at a time (weights restored after)."""
    base = mean_nll(model, tokens, batch_size)
    rows = []
    for name, linear in target_linears(model).items():
        original = linear.weight.detach().clone()
        delta = {}
        for bits in candidates:
            linear.weight.copy_(quantize_rtn(original, bits, group_size).dequantize())
            delta[bits] = mean_nll(model, tokens, batch_size) - base
        linear.weight.copy_(original)
        rows.append(LayerSensitivity(name, original.numel(), delta))
    return rows


def choose_bits(rows: list[LayerSensitivity], target_bits: float) -> list[LayerSensitivity]:
    """Assign `bits` to each row so that the parameter-weighted mean is at most `target_bits` (greedy)."""
    widths = sorted(rows[0].delta)
    total = sum(r.parameters for r in rows)
    for r in rows:
        r.bits = widths[0]
    budget = target_bits * total - sum(r.bits * r.parameters for r in rows)
    while True:
        best, best_gain = None, 0.0
        for r in rows:
            wider = [b for b in widths if b > r.bits]
            if not wider:
                continue
            b = wider[0]
            cost = (b - r.bits) * r.parameters
            gain = (r.delta[r.bits] - r.delta[b]) / cost
            if cost <= budget and gain > best_gain:
                best, best_gain = (r, b, cost), gain
        if best is None:
            return rows
        r, b, cost = best
        r.bits = b
        budget -= cost


def average_bits(rows: list[LayerSensitivity]) -> float:
    return sum(r.bits * r.parameters for r in rows) / sum(r.parameters for r in rows)


def format_table(rows: list[LayerSensitivity]) -> str:
    widths = sorted(rows[0].delta)
    head = "| layer | parameters | " + " | ".join(f"Δ loss int{b}" for b in widths) + " | chosen |"
    lines = [head, "|" + " --- |" * (len(widths) + 3)]
    for r in rows:
        cells = " | ".join(f"{r.delta[b]:+.4f}" for b in widths)
        lines.append(f"| {r.name} | {r.parameters:,} | {cells} | int{r.bits} |")
    lines.append(f"average: {average_bits(rows):.2f} bits per weight (codes only; scales add 32/group for each)")
    return "\n".join(lines)


__all__ = ["LayerSensitivity", "average_bits", "choose_bits", "format_table", "sensitivity_scan"]
