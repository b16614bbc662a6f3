"""Quantized linear layers: what `quantize_model` swaps in by name for the model's `Linear` leaves.

- `IntLinear`: weight-only int8 / int4 / int3 (RTN, GPTQ, AWQ, QAT's converted model). On the CPU its
  forward calls torch's packed kernels where the format allows it: `aten._weight_int8pack_mm` for
  symmetric per-channel int8 and `aten._weight_int4pack_mm_for_cpu` for int4 in groups of 32-256
  (any zero points). On a CPU with native bf16 (AVX-512 BF16 / AMX) the activations go into those
  kernels as bf16: torch 2.13's fp32-activation versions are scalar loops, measured 100-300x slower
  than the bf16 ones here (1024 x 1024 int4: 36 ms vs 0.11 ms), while rounding the activations to
  bf16 (8 bits of mantissa) costs far less accuracy than the 4- or 8-bit weights already do. Eager, the
  aten ops run as they are. Inside a compiled decode step (lmstack.generate.compiled, which freezes
  buffers into constants) inductor lowers both to its own C++ weight-only GEMM templates where they
  apply (int8: always; int4: AVX-512, bf16, groups of 32-128, N padded to a multiple of 64), which at
  batch 1 run several times faster than the ops' own kernels; elsewhere int4 goes in as an opaque op. Other formats (int3, int8 in groups) dequantize the weight and call F.linear.
- `NF4Linear`: NF4 / FP4 (bitsandbytes' layout, lmstack.quant.nf4), dequantized per call; QLoRA's base.
- `Int8DynamicLinear`: W8A8 (SmoothQuant, dynamic quantization): int8 per-channel weights, activations
  quantized per token at run time, an int8 x int8 -> int32 GEMM (`torch._int_mm`) and one rescale.

Every module keeps the on-disk tensors as persistent buffers (`qweight`, `scales`, `zeros`, ...) and the
kernel's own packing, which differs, as a non-persistent buffer built from them: `state_dict` is the
documented format whatever the machine, and loading rebuilds the kernel form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.device import cpu_has_native_bf16
from lmstack.quant.formats import IntWeight, pack, unpack
from lmstack.quant.nf4 import NF4Weight

INT4_KERNEL_GROUPS = (32, 64, 128, 256)
_HAS_INT8_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")
_HAS_INT4_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
# The activation dtype the packed kernels take (see the module docstring); decided once per process.
KERNEL_DTYPE = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
# Inside a compiled decode step inductor can lower the int4 op to its own C++ weight-only-int4 GEMM template
# (torch/_inductor/codegen/cpp_micro_gemm.py: AVX-512 micro-kernels, bf16 activations, groups of 32/64/128,
# N a multiple of 64), measured 4x faster than the op's own kernel at batch 1 here. Where it cannot, the op stays
# the opaque call (with the C++ template as the only GEMM backend a lowering with no choice fails to compile).
INT4_TEMPLATE_GROUPS = (32, 64, 128)
INT4_TEMPLATE_N = 64
INT4_TEMPLATE = KERNEL_DTYPE == torch.bfloat16 and torch.backends.cpu.get_cpu_capability() == "AVX512"


# The int4 kernel as an opaque op, for a compiled graph where inductor's int4 template does not apply (see
# INT4_TEMPLATE): inductor then calls it as it is, instead of lowering it into a GEMM autotuning with no choice.
# Eager code and the int8 kernel (whose template always applies) call the aten ops directly. A plain library op
# rather than @torch.library.custom_op, whose Python dispatch on each of ~60 calls a token cost 10% of eager int4
# decode here (69.6 vs 76.6 tokens/s at one thread). No autograd: IntLinear sends inputs that require grad through
# dequantize-then-matmul.
_OPS = torch.library.Library("lmstack", "FRAGMENT")
_OPS.define("int4_weight_mm(Tensor x, Tensor packed, int group_size, Tensor scales_and_zeros) -> Tensor")
_OPS.impl("int4_weight_mm", lambda x, packed, group_size, scales_and_zeros:
          torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros), "CPU")


@torch.library.register_fake("lmstack::int4_weight_mm")
def _(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[0])


def int4_weight_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int,
                   scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ W^T, W from torch's CPU int4 packing: (N, K/2) uint8 and (K/group, N, 2) scales / offsets
    (in x's dtype)."""
    return torch.ops.lmstack.int4_weight_mm(x, packed, group_size, scales_and_zeros)


def _bias_buffer(module: nn.Module, bias: torch.Tensor | None) -> None:
    module.register_buffer("bias", None if bias is None else bias.detach().float().clone())


class IntLinear(nn.Module):
    """y = x @ W_hat^T + b with W_hat = (q - z) * s stored as b-bit codes (lmstack.quant.formats)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None,
                 bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        groups = in_features // (group_size or in_features)
        self.register_buffer("qweight", torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        _bias_buffer(self, torch.zeros(out_features) if bias else None)
        self.kernel = "dequantize"
        self._build_kernel()

    @classmethod
    def from_weight(cls, weight: IntWeight, bias: torch.Tensor | None = None) -> IntLinear:
        N, K = weight.shape
        module = cls(K, N, weight.bits, weight.group_size, bias is not None)
        module.qweight = pack(weight.codes, weight.bits)
        module.scales, module.zeros = weight.scales.float().contiguous(), weight.zeros.contiguous()
        _bias_buffer(module, bias)
        module._build_kernel()
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (N, K) weight, computed on each access (for code that reads `.weight.device` / `.dtype`
        of whatever sits at a linear's place, e.g. a quantized lm_head during generation)."""
        return self.int_weight().dequantize()

    def int_weight(self) -> IntWeight:
        return IntWeight(unpack(self.qweight, self.bits, self.in_features), self.scales, self.zeros, self.bits,
                         self.group_size)

    def _build_kernel(self) -> None:
        """Derive the CPU kernel's packing from the stored codes (after construction or loading)."""
        self.kernel, self.int4_lowered = "dequantize", False
        for name in ("w_int8", "kernel_scales", "w_int4", "scales_and_zeros"):
            self.register_buffer(name, None, persistent=False)
        if self.qweight.device.type != "cpu":
            return
        codes = unpack(self.qweight, self.bits, self.in_features)
        if self.bits == 8 and self.group_size is None and _HAS_INT8_KERNEL and bool((self.zeros == 128).all()):
            self.w_int8 = (codes.int() - 128).to(torch.int8)  # (N, K): symmetric codes, zero point removed
            self.kernel_scales = self.scales.view(-1).to(KERNEL_DTYPE)
            self.kernel = "int8"
        elif self.bits == 4 and self.group_size in INT4_KERNEL_GROUPS and _HAS_INT4_KERNEL:
            # The kernel computes (q - 8) * s + m per group, so m = (8 - z) * s.
            m = (8 - self.zeros.float()) * self.scales
            scales, codes = self.scales, codes.int()
            self.int4_lowered = INT4_TEMPLATE and self.group_size in INT4_TEMPLATE_GROUPS
            # torch's packing needs a multiple of 16 rows, the template 64: rows of zero weight (scale 0, offset 0)
            # up to that, sliced off the output
            pad = -self.out_features % (INT4_TEMPLATE_N if self.int4_lowered else 16)
            if pad:
                codes, scales, m = (F.pad(t, (0, 0, 0, pad)) for t in (codes, scales, m))
            self.w_int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            sz = torch.stack([scales, m], -1).transpose(0, 1).contiguous()  # (G, N + pad, 2)
            self.scales_and_zeros = sz.to(KERNEL_DTYPE)
            self.kernel = "int4"

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._build_kernel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N)."""
        if self.kernel == "dequantize" or x.dtype != torch.float32 or x.device.type != "cpu" or x.requires_grad:
            w = self.int_weight().dequantize(x.dtype)
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)  # (M, K)
        if self.kernel == "int8":
            # Compiled, inductor lowers this op to its C++ weight-only-int8 GEMM template (AVX-512 / AMX
            # micro-kernels, the frozen weights pre-packed)
            y = torch.ops.aten._weight_int8pack_mm(flat, self.w_int8, self.kernel_scales)
        elif self.int4_lowered or not torch.compiler.is_compiling():
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.w_int4, self.group_size, self.scales_and_zeros)
        else:  # a compiled graph where inductor's int4 template does not apply
            y = int4_weight_mm(flat, self.w_int4, self.group_size, self.scales_and_zeros)
        y = y[:, : self.out_features].to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def nbytes(self) -> int:
        return self.int_weight().nbytes() + (0 if self.bias is None else self.bias.numel() * 4)

    def extra_repr(self) -> str:
        group = self.group_size or "channel"
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}, group={group}, kernel={self.kernel}"


class NF4Linear(nn.Module):
    """A linear whose weight is NF4 / FP4 (lmstack.quant.nf4); dequantized to the input's dtype per call."""

    def __init__(self, in_features: int, out_features: int, quant_type: str = "nf4", block_size: int = 64,
                 double_quant: bool = True, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.block_size, self.double_quant = quant_type, block_size, double_quant
        n = in_features * out_features
        blocks = -(-n // block_size)
        self.register_buffer("packed", torch.zeros(-(-n // 2), dtype=torch.uint8))
        self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8 if double_quant else torch.float32))
        self.register_buffer("dq_absmax", torch.zeros(-(-blocks // 256)) if double_quant else None)
        self.register_buffer("dq_offset", torch.zeros(()) if double_quant else None)
        _bias_buffer(self, torch.zeros(out_features) if bias else None)

    @classmethod
    def from_weight(cls, weight: NF4Weight, bias: torch.Tensor | None = None) -> NF4Linear:
        N, K = weight.shape
        module = cls(K, N, weight.quant_type, weight.block_size, weight.double_quant, bias is not None)
        for name, tensor in weight.state_dict().items():
            setattr(module, name, tensor)
        _bias_buffer(module, bias)
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (N, K) weight, computed on each access (see IntLinear.weight)."""
        return self.nf4_weight().dequantize()

    def nf4_weight(self) -> NF4Weight:
        state = {"packed": self.packed, "absmax": self.absmax, "dq_absmax": self.dq_absmax,
                 "dq_offset": self.dq_offset}
        return NF4Weight.from_state_dict({k: v for k, v in state.items() if v is not None},
                                         (self.out_features, self.in_features), self.block_size, self.quant_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.nf4_weight().dequantize(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def nbytes(self) -> int:
        return self.nf4_weight().nbytes() + (0 if self.bias is None else self.bias.numel() * 4)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.quant_type}, block={self.block_size}, "
                f"double_quant={self.double_quant}")


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row: x (M, K) -> (codes (M, K) int8, scales (M, 1) fp32), x ~ codes * scales."""
    scale = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-8)
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


class Int8DynamicLinear(nn.Module):
    """W8A8: int8 weights (symmetric, per output channel), activations quantized per token at run time.

    y = (q_x @ q_w^T) * s_x * s_w in one int32 GEMM (`torch._int_mm`). With `smooth` (SmoothQuant), the
    smoothing factors have already been folded into the previous layer and this weight; nothing here
    changes: the layer is the same W8A8 GEMM, on an input with smaller outliers.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))
        _bias_buffer(self, torch.zeros(out_features) if bias else None)
        self._build_kernel()

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8DynamicLinear:
        N, K = weight.shape
        module = cls(K, N, bias is not None)
        module.scales = (weight.detach().float().abs().amax(1) / 127).clamp(min=1e-8)
        module.qweight = torch.round(weight.detach().float() / module.scales[:, None]).clamp(-127, 127).to(torch.int8)
        _bias_buffer(module, bias)
        module._build_kernel()
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (N, K) weight, computed on each access (see IntLinear.weight)."""
        return self.qweight.float() * self.scales[:, None]

    def _build_kernel(self) -> None:
        self.register_buffer("qweight_t", self.qweight.t().contiguous(), persistent=False)  # (K, N) for _int_mm

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._build_kernel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()  # (M, K)
        q, s = quantize_per_token(flat)
        if x.device.type == "cpu":
            acc = torch._int_mm(q, self.qweight_t)  # (M, N) int32
        else:  # elsewhere in fp32: the int8 products are exact, their sums rounded as any fp32 GEMM's
            acc = q.float() @ self.qweight_t.float()
        y = (acc.float() * s * self.scales).view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 4 + (0 if self.bias is None else self.bias.numel() * 4)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w8a8 dynamic per-token"


QUANTIZED_MODULES = (IntLinear, NF4Linear, Int8DynamicLinear)


def target_linears(model: nn.Module, include_head: bool = False) -> dict[str, nn.Linear]:
    """Full name -> linear leaf that quantization replaces (block linears, and the head when asked).

    A head tied to the embedding is quantized as its own copy: the embedding stays in full precision (a
    lookup reads one row per token; the head reads the whole matrix every decode step, which is what
    weight-only quantization saves)."""
    targets = {name: m for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.startswith("model.layers.")}
    if include_head and isinstance(model.lm_head, nn.Linear):
        targets["lm_head"] = model.lm_head
    return targets


def swap_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called `name` (e.g. "model.layers.0.mlp.up_proj") by `module`."""
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


__all__ = [
    "INT4_KERNEL_GROUPS",
    "QUANTIZED_MODULES",
    "Int8DynamicLinear",
    "IntLinear",
    "NF4Linear",
    "quantize_per_token",
    "swap_module",
    "target_linears",
]
