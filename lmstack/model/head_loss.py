"""The LM head fused with cross-entropy: the summed next-token loss without the (N, V) logits tensor.

Why: at 2048 tokens and an 8192-word vocabulary the logits, their log-softmax and their gradient
are 64 MiB each. Tensors that size are above glibc's mmap threshold, so each one is a fresh mmap
that page-faults in, 4 KiB at a time, every step (tens of thousands of faults for a small model),
and each full pass over them streams through memory. Here the tokens go through the head in chunks
of ~16 MiB of logits (at least 256 tokens): each chunk's log-sum-exp, loss and gradient (softmax minus one-hot) are
computed while it sits in cache, and the chunk's contribution to the input and weight gradients is
multiplied out at once (the "fused linear cross-entropy" of Liger-Kernel, on the CPU). The backward
pass then only scales the two stored gradients by the incoming scalar.

Same arithmetic as F.linear + F.cross_entropy (fp32, log-sum-exp with the max subtracted); the
tests check loss and gradients against that and against transformers. CPU fp32 only, where it is
measured; on CUDA or under autocast the head and the loss run unfused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmstack.model.linear import nt_matmul

CHUNK_BYTES = 16 * 2**20  # logits per chunk: in cache, and below glibc's 32 MiB mmap threshold
MIN_CHUNK_ROWS = 256  # but no fewer tokens than this: a GEMM with fewer rows loses speed (GPT-2's 50k vocab)


@torch.library.custom_op("lmstack::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                          grad_hidden_wanted: bool, grad_weight_wanted: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, d), weight (V, d), targets (N,) -> (loss summed over kept targets, d loss/d hidden (N, d),
    d loss/d weight (V, d)); a gradient that is not wanted comes back empty (a frozen head computes none)."""
    N, V = hidden.shape[0], weight.shape[0]
    kept = targets[targets != ignore_index]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= V):
        raise IndexError(f"target ids must lie in [0, {V}) or equal ignore_index {ignore_index}; "
                         f"got {int(kept.min())}..{int(kept.max())}")
    rows = max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * V))
    loss = torch.zeros((), dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if grad_hidden_wanted else hidden.new_empty(0)
    grad_weight = torch.empty_like(weight) if grad_weight_wanted else weight.new_empty(0)
    if grad_weight_wanted and N == 0:
        grad_weight.zero_()  # no chunk will write it
    for start in range(0, N, rows):
        h, t = hidden[start:start + rows], targets[start:start + rows]  # (n, d), (n,)
        logits = nt_matmul(h, weight).float()  # (n, V)
        keep = (t != ignore_index)[:, None]  # (n, 1)
        safe_t = torch.where(keep[:, 0], t, 0)[:, None]  # (n, 1)
        target_logit = logits.gather(1, safe_t)  # (n, 1)
        row_max = logits.amax(dim=-1, keepdim=True)  # (n, 1)
        exp = logits.sub_(row_max).exp_()  # in place of the logits: the chunk is the only big buffer
        row_sum = exp.sum(dim=-1, keepdim=True)  # (n, 1)
        loss += ((row_max + row_sum.log() - target_logit) * keep).sum()  # log-sum-exp minus the target's logit
        if grad_hidden_wanted or grad_weight_wanted:
            grad_logits = exp.mul_(keep / row_sum)  # softmax; zero on ignored positions
            grad_logits.scatter_add_(1, safe_t, -keep.to(grad_logits.dtype))  # minus the one-hot target
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden_wanted:
                grad_hidden[start:start + rows] = nt_matmul(grad_logits, weight.t())  # (n, V) @ (V, d)
            if grad_weight_wanted and start == 0:
                torch.mm(grad_logits.t(), h, out=grad_weight)  # (V, n) @ (n, d)
            elif grad_weight_wanted:
                grad_weight.addmm_(grad_logits.t(), h)
    return loss, grad_hidden, grad_weight


@_linear_cross_entropy.register_fake
def _(hidden, weight, targets, ignore_index, grad_hidden_wanted, grad_weight_wanted):
    return (hidden.new_empty(()).float(), torch.empty_like(hidden) if grad_hidden_wanted else hidden.new_empty(0),
            torch.empty_like(weight) if grad_weight_wanted else weight.new_empty(0))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index):
        loss, grad_hidden, grad_weight = _linear_cross_entropy(hidden, weight, targets, ignore_index,
                                                               ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss if ctx.needs_input_grad[0] else None,
                grad_weight * grad_loss if ctx.needs_input_grad[1] else None, None, None)


def use_fused(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """The fused path: fp32 on the CPU without autocast (where it is tested and measured); elsewhere the
    head and the loss run as F.linear + F.cross_entropy."""
    return (hidden.device.type == "cpu" and hidden.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets`, summed over the kept targets (fp32 scalar).

    hidden (..., d), weight (V, d), targets (...) int64. A target outside [0, V) other than
    `ignore_index` is an error, as in F.cross_entropy.
    """
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if not use_fused(hidden, weight):
        return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index, reduction="sum")
    return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index)
