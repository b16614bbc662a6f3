"""QLoRA's frozen base: linear layers whose weights are stored as NF4 (lmstack.quant.nf4: bitsandbytes' format,
blocks of 64, double-quantized scales: 4.127 bits per weight) and dequantized on the fly for each matmul.

    quantize_base(model)     every linear but the head -> NF4Linear (in place); then apply_lora(model, ...)

The dequantized weight is never kept: forward dequantizes, multiplies and drops it, and backward (which
needs W only for the input gradient: the base is frozen) dequantizes again. So between forward and
backward a layer holds its 4-bit codes and nothing else, which is where QLoRA's memory saving comes from.
On CUDA the weight is dequantized straight to the autocast dtype (bf16): QLoRA's bf16 compute.

Shapes: x (..., d_in), W (d_out, d_in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.adapters.inject import linear_modules, set_module
from lmstack.quant.nf4 import CODES, DQ_BLOCK_SIZE, NF4Weight, dynamic_map, quantize_nf4


def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """(256, 2): the two code values a packed byte holds, high nibble first: one gather per byte, not per nibble."""
    byte = torch.arange(256, device=device)
    code = CODES[quant_type].to(device)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)


def dequantize(q: NF4Weight, table: torch.Tensor, dtype: torch.dtype, dq_code: torch.Tensor | None = None
               ) -> torch.Tensor:
    """NF4Weight -> (d_out, d_in) weight in `dtype`; the same values as q.dequantize(), computed faster: a byte
    looks up both of its codes at once (an embedding lookup, the fastest gather torch has on the CPU)."""
    values = F.embedding(q.packed.int(), table).view(-1)[: q.numel]  # (n,) fp32 code values
    if q.double_quant:  # q.scales(), without rebuilding the dynamic map each call
        code = dynamic_map().to(q.absmax.device) if dq_code is None else dq_code
        blocks = q.absmax.numel()
        scales = code[q.absmax.long()] * q.dq_absmax.repeat_interleave(DQ_BLOCK_SIZE)[:blocks] + q.dq_offset
    else:
        scales = q.absmax
    if q.numel % q.block_size == 0:
        values = (values.view(-1, q.block_size) * scales[:, None]).view(-1)
    else:
        values = values * scales.repeat_interleave(q.block_size)[: q.numel]
    return values.view(q.shape).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """y = x @ dequantize(W)^T, with W dequantized again in backward instead of saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.weight_for(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.weight_for(grad.dtype), None  # (..., d_out) @ (d_out, d_in)


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4 (codes, scales as buffers); the bias, if any, stays in full precision."""

    def __init__(self, linear: nn.Linear, block_size: int = 64, double_quant: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q = quantize_nf4(linear.weight.detach(), block_size, double_quant)
        self.block_size, self.quant_type, self.weight_dtype = q.block_size, q.quant_type, q.dtype
        for name, tensor in q.state_dict().items():
            self.register_buffer(name, tensor)
        self.register_buffer("pair_table", _pair_table(q.quant_type, q.packed.device), persistent=False)
        self.register_buffer("dq_code", dynamic_map().to(q.packed.device), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def nf4(self) -> NF4Weight:
        return NF4Weight.from_state_dict({n: b for n, b in self.named_buffers() if n not in ("pair_table", "dq_code")},
                                         (self.out_features, self.in_features), self.block_size, self.quant_type,
                                         self.weight_dtype)

    def weight_for(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.nf4, self.pair_table, dtype, self.dq_code)

    def dequantize(self) -> torch.Tensor:
        """The (d_out, d_in) weight in the dtype it was quantized from."""
        return self.weight_for(self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Matmul.apply(x, self) if torch.is_grad_enabled() and x.requires_grad else \
            F.linear(x, self.weight_for(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def nbytes(self) -> int:
        """Bytes of the stored weight: codes, scales and their scales (the bias not counted)."""
        return self.nf4.nbytes()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}, block {self.block_size}"


@torch.no_grad()
def quantize_base(model: nn.Module, block_size: int = 64, double_quant: bool = True) -> list[str]:
    """Replace every linear layer but the head by an NF4Linear (in place); -> their names. Embeddings, norms and the
    head stay in full precision (as in QLoRA)."""
    names = []
    for name, module in linear_modules(model).items():
        if isinstance(module, nn.Linear):
            set_module(model, name, NF4Linear(module, block_size, double_quant))
            names.append(name)
    return names


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight the model stores: parameters (shared ones once) plus the NF4 layers' packed buffers."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() * p.element_size() for p in params) + sum(
        m.nbytes() for m in model.modules() if isinstance(m, NF4Linear))


__all__ = ["NF4Linear", "dequantize", "quantize_base", "weight_bytes"]
