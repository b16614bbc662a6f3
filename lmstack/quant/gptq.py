"""GPTQ (Frantar et al. 2022): quantize a weight column by column, each rounding error pushed onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's squared output error.

For a linear with weight W (N, K) and calibration inputs X (n, K), the layer's output error
||X W^T - X Q^T||^2 has Hessian H = 2 X^T X / n (K, K). The algorithm (the reference implementation's):

1. Dead inputs (H_jj = 0) get H_jj = 1 and W[:, j] = 0. Damping: H += damp * mean(diag H) * I (damp 0.01).
2. Optional act-order: columns in order of decreasing H_jj (the inputs with most energy first).
3. U = the upper Cholesky factor of H^-1. For each column i: q = Q(w_i); e = (w_i - q) / U_ii;
   W[:, i:] -= e U[i, i:]. Done lazily in blocks of 128 columns: updates inside a block, then one
   GEMM for the columns after it.
4. Groups: a group's scale and zero point are computed when its first column comes up, from the
   weights as updated so far. With act-order, groups are "static" instead (computed from the original
   weights before any update, as AutoGPTQ's static_groups) so that group g is still columns
   g*G..(g+1)*G-1 in the stored layout and no permutation index needs storing.

With H = I every off-diagonal term of U is zero: no error is pushed anywhere and GPTQ is exactly RTN
(tested).
"""

from __future__ import annotations

import torch
from torch import nn

from lmstack.errors import ConfigError
from lmstack.quant.calibration import BlockWalk, record_inputs
from lmstack.quant.formats import IntWeight, check_group_size, qparams, quantize_codes


class HessianAccumulator:
    """H = 2 X^T X / n over all calibration tokens seen, accumulated batch by batch (fp64 sums)."""

    def __init__(self, in_features: int):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).double()  # (n, K)
        self.sum += flat.t() @ flat
        self.count += flat.shape[0]

    def hessian(self) -> torch.Tensor:
        return (2 * self.sum / max(self.count, 1)).float()


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                  symmetric: bool = False, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False) -> IntWeight:
    """W (N, K) and its input Hessian H (K, K) -> IntWeight (codes, scales and zeros in the original column order)."""
    N, K = weight.shape
    check_group_size("weight", K, group_size)
    W = weight.detach().float().clone()
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    g = group_size or K
    groups = K // g
    scales = torch.zeros(N, groups)
    zeros = torch.zeros(N, groups)
    if act_order or group_size is None:  # static: every group's parameters from the weights as they are now
        s, z = qparams(W.view(N, groups, g), bits, symmetric)
        scales[:], zeros[:] = s, z
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise ConfigError(f"GPTQ: the Hessian is not positive definite even with damp={damp}; "
                          f"raise --damp or give more calibration text") from None

    codes = torch.zeros(N, K)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        errors = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = perm[i1 + i].item()  # the original column this one is
            group = column // g
            if not act_order and group_size is not None and column % g == 0:
                # a new group starts: its parameters from the weights as updated so far (the reference's choice:
                # W, not W1, so this block's own pending updates to those columns are not seen yet)
                s, z = qparams(W[:, column:column + g], bits, symmetric)
                scales[:, group], zeros[:, group] = s, z
            w = W1[:, i]
            q = quantize_codes(w[:, None], scales[:, group], zeros[:, group], bits)[:, 0]  # (N,)
            codes[:, i1 + i] = q
            w_hat = (q - zeros[:, group]) * scales[:, group]
            error = (w - w_hat) / U1[i, i]
            W1[:, i:] -= error[:, None] * U1[i, i:][None, :]
            errors[:, i] = error
        W[:, i2:] -= errors @ U[i1:i2, i2:]

    inverse = torch.argsort(perm)
    return IntWeight(codes[:, inverse].to(torch.uint8), scales, zeros.to(torch.uint8), bits, group_size)


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def block_linears(block: nn.Module) -> list[str]:
    """The names (within a block) of its linear leaves, in forward order."""
    names = dict(block.named_modules())
    return [n for n in LINEARS if n in names and isinstance(names[n], nn.Linear)]


def gptq_model(model: nn.Module, tokens: torch.Tensor, bits_for: dict[str, int], group_size: int | None,
               symmetric: bool, damp: float = 0.01, act_order: bool = False, batch_size: int = 8,
               on_layer=None) -> dict[str, IntWeight]:
    """GPTQ every linear named in `bits_for` (full names -> bits), block by block on the calibration
    windows `tokens` (n, T). Returns full name -> IntWeight; the caller swaps the modules in (the walk
    itself replaces each block's linears with their quantized weights, dequantized, so later blocks see
    the quantized model's activations)."""
    walk = BlockWalk(model, tokens, batch_size)
    results: dict[str, IntWeight] = {}

    def process(index: int, prefix: str, block: nn.Module) -> None:
        names = [n for n in block_linears(block) if prefix + n in bits_for]
        modules = dict(block.named_modules())
        accumulators = {n: HessianAccumulator(modules[n].in_features) for n in names}
        record_inputs(block, walk, names, lambda name, x: accumulators[name].add(x))
        for name in names:
            linear = modules[name]
            q = gptq_quantize(linear.weight, accumulators[name].hessian(), bits_for[prefix + name], group_size,
                              symmetric, damp, act_order=act_order)
            results[prefix + name] = q
            with torch.no_grad():
                linear.weight.copy_(q.dequantize(linear.weight.dtype))  # the next blocks see quantized outputs
            if on_layer is not None:
                on_layer(prefix + name)

    walk.walk(process)
    return results


__all__ = ["LINEARS", "HessianAccumulator", "block_linears", "gptq_model", "gptq_quantize"]
