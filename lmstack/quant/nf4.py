"""NF4 and FP4 4-bit weights (QLoRA's formats), with optional double quantization of the scales.

The format is bitsandbytes' (`bnb.functional.quantize_4bit`), byte for byte, so a weight quantized
here dequantizes to the same values there and back:

- The weight is flattened (row-major) and cut into blocks of `block_size` (64) values; a last,
  shorter block holds the remainder. Each block keeps its absolute maximum (`absmax`, fp32).
- Each value x is scaled to x / absmax in [-1, 1] (as x * (1 / absmax), bitsandbytes' arithmetic)
  and replaced by the index of the nearest of 16 code values (`NF4_CODE` or `FP4_CODE`; a value
  exactly halfway goes to the lower code).
- Two 4-bit indices per byte, the first element in the HIGH nibble: byte i = idx[2i] << 4 | idx[2i+1]
  (an odd count is padded with the index of 0.0).
- Double quantization (QLoRA's "DQ"): the absmax values, minus their mean (`offset`), are themselves
  quantized in blocks of 256 to 8-bit indices into bitsandbytes' signed dynamic map (`dynamic_map()`),
  each block keeping its own fp32 absmax. That takes the scales' cost from 32/64 = 0.5 bits per weight
  to 8/64 + 32/(64*256) ~ 0.127 bits: 4.127 bits per weight in all instead of 4.5.

NF4 is "4-bit NormalFloat": the codes are quantiles of N(0, 1) scaled to [-1, 1] with an exact zero,
so for normally distributed weights each code is used about equally often. FP4 is a 1-2-1 float
(sign, 2 exponent bits, 1 mantissa bit) scaled to [-1, 1]; its index is its bit pattern.

    w = torch.randn(4096, 4096)
    q = quantize_nf4(w)                  # NF4Weight: packed (8388608,) uint8 + scales
    w_hat = q.dequantize()               # (4096, 4096) fp32
    q.bytes_per_parameter()              # 0.5158 (4.127 bits)
    tensors = q.state_dict()             # plain tensors for safetensors; NF4Weight.from_state_dict(...)

Self-contained on purpose (torch only): QLoRA's frozen base weights and `lmstack quantize --method
nf4` share this one implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# bitsandbytes' NF4 table (QLoRA, Appendix E: create_normal_map(offset=0.9677083)), index = stored nibble.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

# FP4 (E2M1, exponent bias 2): index = bit pattern (sign, exponent, mantissa), values divided by 12.
FP4_CODE = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                         -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], dtype=torch.float32) / 12.0

CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
DQ_BLOCK_SIZE = 256  # blocks of the double-quantized absmax values (bitsandbytes' choice)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`): 256 sorted values in [-1, 1].

    A sign, a run of zero bits giving the decimal exponent 10^-(6..0) and the remaining bits a linear
    fraction in (0.1, 1): fine steps near zero, coarse near one. Computed exactly as bitsandbytes
    does (fp32 linspace and products), so the codes are bit-identical.
    """
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += (10 ** (-6 + i) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into `code` of the value nearest each element of `scaled` (ties to the lower value) (n,) -> (n,) int64."""
    values, order = torch.sort(code, stable=True)
    midpoints = (values[:-1] + values[1:]) / 2
    return order[torch.bucketize(scaled, midpoints)]


def _blockwise(x: torch.Tensor, block_size: int, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat x (n,) -> (indices (n,) int64, absmax (ceil(n / block_size),) fp32): absmax-scaled nearest codes."""
    n = x.numel()
    blocks = -(-n // block_size)
    padded = torch.zeros(blocks * block_size, dtype=torch.float32, device=x.device)
    padded[:n] = x.float()
    padded = padded.view(blocks, block_size)  # zeros in a short last block change neither its absmax nor its codes
    absmax = padded.abs().amax(dim=1)
    scaled = torch.clamp(padded * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1)
    return _nearest_code(scaled.view(-1)[:n], code.to(x.device)), absmax


def _expand(absmax: torch.Tensor, block_size: int, n: int) -> torch.Tensor:
    """Per-block values (blocks,) -> one per element (n,)."""
    return absmax.repeat_interleave(block_size)[:n]


@dataclass
class NF4Weight:
    """A 4-bit (NF4 or FP4) weight in bitsandbytes' layout; see the module docstring.

    packed: (ceil(n / 2),) uint8, two codes per byte, first element in the high nibble.
    absmax: (blocks,) fp32 block maxima; with double quantization (blocks,) uint8 indices into `dynamic_map()`.
    dq_absmax: (ceil(blocks / 256),) fp32 absmax of each block of scales (double quantization only).
    dq_offset: () fp32, the mean subtracted from the scales before double quantization.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    block_size: int = 64
    quant_type: str = "nf4"
    dtype: torch.dtype = torch.float32
    dq_absmax: torch.Tensor | None = None
    dq_offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.dq_absmax is not None

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def codes(self) -> torch.Tensor:
        """The 4-bit indices, unpacked: (n,) int64."""
        pairs = torch.stack([self.packed >> 4, self.packed & 0xF], dim=1)  # (n/2, 2): high nibble first
        return pairs.view(-1)[: self.numel].long()

    def scales(self) -> torch.Tensor:
        """The fp32 per-block absmax values (dequantized first when double-quantized): (blocks,)."""
        if not self.double_quant:
            return self.absmax
        code = dynamic_map().to(self.absmax.device)
        values = code[self.absmax.long()] * _expand(self.dq_absmax, DQ_BLOCK_SIZE, self.absmax.numel())
        return values + self.dq_offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight back in `dtype` (default: the dtype it was quantized from), shape `shape`."""
        code = CODES[self.quant_type].to(self.packed.device)
        values = code[self.codes()] * _expand(self.scales(), self.block_size, self.numel)  # fp32, as bitsandbytes
        return values.view(self.shape).to(dtype or self.dtype)

    def nbytes(self) -> int:
        """Bytes stored: packed codes, scales and (with double quantization) the scales' scales and offset."""
        tensors = [self.packed, self.absmax] + ([self.dq_absmax, self.dq_offset] if self.double_quant else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def bytes_per_parameter(self) -> float:
        """nbytes / parameters: 0.5625 for NF4 in blocks of 64, 0.5158 (4.127 bits) with double quantization."""
        return self.nbytes() / self.numel

    def to(self, device: torch.device | str) -> NF4Weight:
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return NF4Weight(self.packed.to(device), self.absmax.to(device), self.shape, self.block_size,
                         self.quant_type, self.dtype, move(self.dq_absmax), move(self.dq_offset))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors to store (safetensors); the rest (shape, block size, type, dtype) is the caller's metadata."""
        state = {"packed": self.packed, "absmax": self.absmax}
        if self.double_quant:
            state |= {"dq_absmax": self.dq_absmax, "dq_offset": self.dq_offset}
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], shape: tuple[int, ...], block_size: int = 64,
                        quant_type: str = "nf4", dtype: torch.dtype = torch.float32) -> NF4Weight:
        return cls(state["packed"], state["absmax"], tuple(shape), block_size, quant_type, dtype,
                   state.get("dq_absmax"), state.get("dq_offset"))


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True,
                 quant_type: str = "nf4") -> NF4Weight:
    """Quantize a float tensor (any shape) to NF4 (or `quant_type="fp4"`) in blocks of `block_size`.

    double_quant: also quantize the block scales (8-bit dynamic codes in blocks of 256, mean removed).
    """
    if quant_type not in CODES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', not {quant_type!r}")
    if block_size < 2 or block_size % 2:
        raise ValueError(f"block_size must be an even number >= 2, not {block_size}")
    if not weight.is_floating_point():
        raise ValueError(f"can only quantize a floating-point tensor, not {weight.dtype}")
    flat = weight.detach().reshape(-1)
    idx, absmax = _blockwise(flat, block_size, CODES[quant_type])
    if idx.numel() % 2:  # the last byte's low nibble: the code of 0.0, as bitsandbytes pads
        idx = torch.cat([idx, _nearest_code(torch.zeros(1, device=idx.device), CODES[quant_type].to(idx.device))])
    packed = (idx[0::2] << 4 | idx[1::2]).to(torch.uint8)
    q = NF4Weight(packed, absmax, tuple(weight.shape), block_size, quant_type, weight.dtype)
    if double_quant:
        offset = absmax.mean()
        q.absmax, q.dq_absmax = _blockwise(absmax - offset, DQ_BLOCK_SIZE, dynamic_map())
        q.absmax = q.absmax.to(torch.uint8)
        q.dq_offset = offset
    return q


def quantize_fp4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Weight:
    """`quantize_nf4(..., quant_type="fp4")`."""
    return quantize_nf4(weight, block_size, double_quant, "fp4")


__all__ = ["CODES", "DQ_BLOCK_SIZE", "FP4_CODE", "NF4_CODE", "NF4Weight", "dynamic_map", "quantize_fp4", "quantize_nf4"]
