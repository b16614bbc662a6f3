"""`Linear`: nn.Linear whose training GEMMs on an x86 CPU run in oneDNN instead of MKL.

Why: on AMD CPUs MKL's fp32 sgemm does not dispatch to its AVX-512 kernels (MKL_VERBOSE reports
"Intel(R) Architecture processors" on a Zen 4, not "AVX-512 enabled"); oneDNN's matmul does, so the
forward product x @ W^T and the input gradient dY @ W run faster in oneDNN there (the measured
figure is in the README's benchmark section). The weight gradient dY^T @ X, a long reduction over
the tokens, stays with MKL: oneDNN is no faster there. Full fp32 both ways.

Only while autograd records (training), and only for products big enough to pay the custom op's
dispatch. Inference keeps F.linear: a compiled decode step pattern-matches aten linear/mm to
pre-pack its weights, which an opaque custom op would prevent. Parameters, names and state dicts
are nn.Linear's, so checkpoints, peft and module swaps see no change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@torch.library.custom_op("lmstack::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T -> (..., N) in oneDNN; weight may be a strided view (e.g. W.t())."""
    return nt_matmul(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    x, weight = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)


def _backward(ctx, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    grad_x = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_x = onednn_linear(grad, weight.t())  # dY (..., N) @ W (N, K): W^T as a view, no copy
    if ctx.needs_input_grad[1]:
        grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])  # (N, K), MKL
    return grad_x, grad_weight


onednn_linear.register_autograd(_backward, setup_context=_setup_context)


# Below ~2^25 multiply-adds per product (e.g. 768 tokens x 128 x 128 features) a GEMM takes well under a
# millisecond, and the custom op's dispatch (tens of microseconds in eager mode) would eat the gain.
_MIN_MACS = 2**25


def _onednn_can_run(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN is here and both operands are fp32 CPU tensors."""
    return _ONEDNN and x.device.type == weight.device.type == "cpu" and x.dtype == weight.dtype == torch.float32


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this product takes the oneDNN path: a large enough fp32 product on the CPU while autograd
    records, and no CPU autocast (which applies to F.linear, not to a custom op)."""
    return (_onednn_can_run(x, weight) and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and x.numel() * weight.shape[0] >= _MIN_MACS)


def nt_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (n, K) @ weight (N, K)^T -> (n, N), in oneDNN for fp32 on the CPU (weight may be a strided view);
    no autograd. For code that computes its own gradients, such as the fused head + loss."""
    if _onednn_can_run(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not use_onednn(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        y = onednn_linear(x, self.weight)
        return y if self.bias is None else y + self.bias
