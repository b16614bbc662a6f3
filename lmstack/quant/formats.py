"""Integer weight formats: int8 / int4 / int3 codes with a scale and zero point per output channel or per group.

A weight W (N, K) (out features, in features) is cut along K into groups of `group_size` columns (or one
group per row: `group_size=None`, "per channel"). Each (row, group) has a scale s and an integer zero
point z, and each value is stored as an unsigned b-bit code

    q = clamp(round(w * (1 / s)) + z, 0, 2^b - 1),      w_hat = (q - z) * s

- asymmetric (min-max): s = (max(w, 0) - min(w, 0)) / (2^b - 1), z = clamp(-round(min(w, 0) / s), 0, 2^b - 1);
- symmetric: s = max|w| / ((2^b - 1) / 2), z = 2^(b-1) (so int8 codes are q - 128 in [-128, 127]).

These are torchao's `choose_qparams_affine` / `quantize_affine` definitions (and GPTQ's quantizer: the
same min-max grid with zero included), tested equal to torchao. A scale never drops below fp32's
smallest normal number, so an all-zero group quantizes to zeros.

Storage (`IntWeight.state_dict`): codes packed along K, `qweight` (N, K * b / 8) uint8: int8 one per byte,
int4 two per byte (element 2i in the low nibble), int3 eight per three bytes (element 8i + j in bits
3j..3j+2 of a little-endian 24-bit word); `scales` (N, G) fp32 and `zeros` (N, G) uint8, G = K / group_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmstack.errors import ConfigError

SUPPORTED_BITS = (8, 4, 3)
_EPS = torch.finfo(torch.float32).smallest_normal


def check_group_size(name: str, in_features: int, group_size: int | None) -> None:
    """A ConfigError naming the layer when its input size is not a whole number of groups."""
    if group_size is not None and (group_size <= 0 or in_features % group_size):
        raise ConfigError(f"{name}: input size {in_features} is not a multiple of the group size {group_size}; "
                          f"choose a --group-size that divides it (e.g. {_divisor_hint(in_features)}) or none "
                          f"(--group-size 0: one scale per output channel)")


def _divisor_hint(k: int) -> int:
    return next((g for g in (128, 64, 32, 16, 8) if k % g == 0), k)


def qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of w (..., k) -> (scale (...,) fp32, zero (...,) fp32 holding integers)."""
    maxq = 2**bits - 1
    w = w.float()
    if symmetric:
        scale = (w.abs().amax(-1) / (maxq / 2)).clamp(min=_EPS)
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = ((hi - lo) / maxq).clamp(min=_EPS)
    zero = (-torch.round(lo / scale)).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """w (..., k) with per-row scale/zero (...,) -> codes (..., k) as fp32 integers in [0, 2^bits - 1]."""
    return torch.clamp(torch.round(w.float() * (1.0 / scale[..., None])) + zero[..., None], 0, 2**bits - 1)


@dataclass
class IntWeight:
    """Unpacked b-bit codes of a (N, K) weight with per-(row, group) scales and zero points.

    codes: (N, K) uint8 in [0, 2^bits - 1]; scales: (N, G) fp32; zeros: (N, G) uint8; G = K / group_size
    (1 when group_size is None: per channel).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def group(self) -> int:
        return self.group_size or self.codes.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, K) weight: (q - z) * s."""
        N, K = self.codes.shape
        g = self.group()
        codes = self.codes.view(N, K // g, g).float()  # (N, G, g)
        w = (codes - self.zeros.float()[..., None]) * self.scales[..., None]
        return w.view(N, K).to(dtype)

    def nbytes(self) -> int:
        """Bytes stored: packed codes, fp32 scales and uint8 zero points."""
        N, K = self.codes.shape
        return N * K * self.bits // 8 + self.scales.numel() * 4 + self.zeros.numel()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"qweight": pack(self.codes, self.bits), "scales": self.scales, "zeros": self.zeros}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], bits: int, group_size: int | None,
                        in_features: int) -> IntWeight:
        return cls(unpack(state["qweight"], bits, in_features), state["scales"].float(), state["zeros"], bits,
                   group_size)


def quantize_rtn(w: torch.Tensor, bits: int = 4, group_size: int | None = 128, symmetric: bool = False) -> IntWeight:
    """Round-to-nearest: (N, K) float weight -> IntWeight with min-max (or absmax) scales per group."""
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"bits must be one of {SUPPORTED_BITS}, not {bits}")
    N, K = w.shape
    check_group_size("weight", K, group_size)
    g = group_size or K
    groups = w.detach().reshape(N, K // g, g)  # (N, G, g)
    scale, zero = qparams(groups, bits, symmetric)  # (N, G)
    codes = quantize_codes(groups, scale, zero, bits).view(N, K)
    return IntWeight(codes.to(torch.uint8), scale, zero.to(torch.uint8), bits, group_size)


# ----------------------------------------------------------------------------------------------- packing
def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) uint8 codes -> (N, K * bits / 8) uint8 (see the module docstring for the bit order)."""
    N, K = codes.shape
    if bits == 8:
        return codes.contiguous()
    if bits == 4:
        pairs = codes.view(N, K // 2, 2)
        return (pairs[..., 0] | pairs[..., 1] << 4).contiguous()
    if bits == 3:
        eights = codes.view(N, K // 8, 8).int()  # (N, K/8, 8)
        word = (eights << torch.arange(0, 24, 3, device=codes.device)).sum(-1)  # (N, K/8): 24 bits each
        return torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], -1).view(N, K * 3 // 8).to(torch.uint8)
    raise ConfigError(f"cannot pack {bits}-bit codes")


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """The inverse of `pack`: (N, K * bits / 8) uint8 -> (N, K) uint8 codes."""
    N = packed.shape[0]
    if bits == 8:
        return packed
    if bits == 4:
        return torch.stack([packed & 0xF, packed >> 4], -1).view(N, in_features)
    if bits == 3:
        triples = packed.view(N, in_features // 8, 3).int()
        word = triples[..., 0] | triples[..., 1] << 8 | triples[..., 2] << 16  # (N, K/8)
        return ((word[..., None] >> torch.arange(0, 24, 3, device=packed.device)) & 7).view(N, in_features).to(
            torch.uint8)
    raise ConfigError(f"cannot unpack {bits}-bit codes")


__all__ = [
    "SUPPORTED_BITS",
    "IntWeight",
    "check_group_size",
    "pack",
    "qparams",
    "quantize_codes",
    "quantize_rtn",
    "unpack",
]
