"""ggml's K-quants Q4_K and Q6_K, and llama.cpp's Q4_K_M choice of which tensor gets which.

Both work on super-blocks of 256 values along a row (QK_K), computed in torch on whole tensors at once,
following ggml's reference quantizers (ggml-quants.c: quantize_row_q4_K_ref, quantize_row_q6_K_ref,
make_qkx2_quants, make_qx_quants) step for step; `torch.round` is ggml's nearest_int (both round half to
even). The `gguf` package reads these blocks (tests/quant/test_gguf.py dequantizes ours with it).

- Q4_K (144 bytes / 256 values, 4.5 bits): 8 sub-blocks of 32, each x ~ d·sc_j·q - dmin·m_j with q in
  0..15. Per sub-block, a weighted least-squares search (make_qkx2_quants: 21 candidate scales, weights
  rms(x) + |x|) picks scale and min; the 8 scales and 8 mins are then quantized to 6 bits against the
  block's fp16 d = max scale / 63 and dmin = max min / 63, and q recomputed against those.
  Layout: d (fp16), dmin (fp16), 12 bytes of 6-bit sc / m (bytes 0-3: sc0-3 with the top bits of sc4-7
  in bits 6-7; bytes 4-7: m0-3 likewise; bytes 8-11: low nibbles of sc4-7 | m4-7 << 4), then 128 bytes
  where byte 32c + l holds sub-block 2c's element l (low nibble) and sub-block 2c + 1's (high nibble).
- Q6_K (210 bytes / 256 values, 6.5625 bits): 16 sub-blocks of 16, x ~ d·sc_j·(q - 32) with q in 0..63
  and sc_j int8. Per sub-block make_qx_quants (19 candidate scales, weights x²) picks a scale; the
  signed scale of largest magnitude maps to sc = -128, d = its scale / -128 (fp16).
  Layout: ql (128 bytes: low 4 bits), qh (64 bytes: high 2 bits), 16 int8 scales, d (fp16); within each
  half of 128 values, ql[l] = q[l] | q[l + 64] << 4, ql[l + 32] = q[l + 32] | q[l + 96] << 4,
  qh[l] = q[l] >> 4 | (q[l + 32] >> 4) << 2 | (q[l + 64] >> 4) << 4 | (q[l + 96] >> 4) << 6.

Q4_K_M (llama.cpp's llama_tensor_get_type for a dense Llama): every matrix Q4_K, except the output
matrix (or, tied, the token embedding) Q6_K, and attn_v / ffn_down Q6_K in the layers where
use_more_bits(i, n) holds (the first and last eighth, and every third layer between). A matrix whose
rows are not a multiple of 256 falls back as llama.cpp's does: Q4_K -> Q5_0, Q6_K -> Q8_0.
"""

from __future__ import annotations

import torch

QK_K = 256


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """The value the block stores (fp16), back in fp32, as the dequantizer will see it."""
    return x.half().float()


def _make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1,
               nstep: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, 32) values and weights -> (scale, -min, codes): x ~ scale * code + min, min <= 0, weighted LSQ."""
    lo = x.amin(1).clamp(max=0)  # (n,)
    hi = x.amax(1)
    flat = hi == lo
    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    sum_w, sum_x = w.sum(1), (w * x).sum(1)
    iscale = nmax / span
    scale = 1 / iscale
    L = torch.round(iscale[:, None] * (x - lo[:, None])).clamp(0, nmax)
    best = (w * (scale[:, None] * L + lo[:, None] - x) ** 2).sum(1)
    for step in range(nstep + 1):  # ggml re-centres on the best min so far: both the span and the offset move
        span = torch.where(flat, torch.ones_like(hi), hi - lo)
        iscale = (rmin + rdelta * step + nmax) / span
        trial = torch.round(iscale[:, None] * (x - lo[:, None])).clamp(0, nmax)
        sum_l, sum_l2, sum_xl = (w * trial).sum(1), (w * trial * trial).sum(1), (w * trial * x).sum(1)
        D = sum_w * sum_l2 - sum_l * sum_l
        safe = torch.where(D > 0, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0  # the min must stay <= 0: refit the scale alone
        this_scale = torch.where(positive, sum_xl / sum_l2.clamp(min=1e-30), this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        mad = (w * (this_scale[:, None] * trial + this_min[:, None] - x) ** 2).sum(1)
        better = (D > 0) & (mad < best)
        L = torch.where(better[:, None], trial, L)
        best = torch.where(better, mad, best)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat[:, None], torch.zeros_like(L), L)
    return scale, -lo, L


def _make_qx(x: torch.Tensor, nmax: int = 32) -> torch.Tensor:
    """(n, 16) values -> a signed scale per row (make_qx_quants, rmse_type 1: weights x²)."""
    index = x.abs().argmax(1, keepdim=True)
    peak = x.gather(1, index).squeeze(1)  # (n,) the value of largest magnitude, signed
    empty = peak.abs() < 1e-15
    peak = torch.where(empty, torch.ones_like(peak), peak)
    w = x * x

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        l = torch.round(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        return (w * x * l).sum(1), (w * l * l).sum(1)

    sum_lx, sum_l2 = fit(-nmax / peak)
    scale = torch.where(sum_l2 > 0, sum_lx / sum_l2.clamp(min=1e-30), torch.zeros_like(sum_lx))
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        sum_lx, sum_l2 = fit(-(nmax + 0.1 * step) / peak)
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        candidate = sum_lx / sum_l2.clamp(min=1e-30)
        scale = torch.where(better, candidate, scale)
        best = torch.where(better, candidate * sum_lx, best)
    return torch.where(empty, torch.zeros_like(scale), scale)


def quantize_q4_k(w: torch.Tensor) -> torch.Tensor:
    """(rows, K) float, K a multiple of 256 -> (rows, K / 256 * 144) uint8 Q4_K blocks."""
    x = w.detach().float().reshape(-1, 8, 32)  # (n, 8 sub-blocks, 32)
    n = x.shape[0]
    av_x = (x * x).mean(2, keepdim=True).sqrt()
    scales, mins, _ = _make_qkx2(x.reshape(-1, 32), (av_x + x.abs()).reshape(-1, 32))
    scales, mins = scales.view(n, 8), mins.view(n, 8)
    max_scale, max_min = scales.amax(1, keepdim=True), mins.amax(1, keepdim=True)
    inv_scale = torch.where(max_scale > 0, 63 / max_scale.clamp(min=1e-30), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63 / max_min.clamp(min=1e-30), torch.zeros_like(max_min))
    sc = torch.round(inv_scale * scales).clamp(max=63).to(torch.uint8)  # (n, 8) 6-bit
    m = torch.round(inv_min * mins).clamp(max=63).to(torch.uint8)
    d, dmin = (max_scale / 63).half(), (max_min / 63).half()  # (n, 1)
    step = d.float() * sc.float()  # (n, 8)
    offset = dmin.float() * m.float()
    safe = torch.where(step == 0, torch.ones_like(step), step)
    q = torch.round((x + offset[..., None]) / safe[..., None]).clamp(0, 15)
    q = torch.where(step[..., None] == 0, torch.zeros_like(q), q).to(torch.uint8)  # (n, 8, 32)

    packed_scales = torch.cat([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                               (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)], 1)  # (n, 12)
    pairs = q.view(n, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    out = torch.cat([d.view(torch.uint8), dmin.view(torch.uint8), packed_scales, qs], 1)  # (n, 144)
    return out.reshape(w.shape[0], -1)


def quantize_q6_k(w: torch.Tensor) -> torch.Tensor:
    """(rows, K) float, K a multiple of 256 -> (rows, K / 256 * 210) uint8 Q6_K blocks."""
    x = w.detach().float().reshape(-1, 16, 16)  # (n, 16 sub-blocks, 16)
    n = x.shape[0]
    scales = _make_qx(x.reshape(-1, 16)).view(n, 16)
    index = scales.abs().argmax(1, keepdim=True)
    max_scale = scales.gather(1, index)  # (n, 1) signed
    empty = max_scale.abs() < 1e-15  # an all-zero block: every byte 0
    iscale = torch.where(empty, torch.zeros_like(max_scale), -128 / torch.where(empty, 1.0, max_scale))
    d = torch.where(empty, torch.zeros_like(max_scale), 1 / torch.where(empty, 1.0, iscale)).half()  # (n, 1)
    sc = torch.round(iscale * scales).clamp(max=127).to(torch.int8)  # (n, 16)
    step = d.float() * sc.float()
    safe = torch.where(step == 0, torch.ones_like(step), step)
    q = torch.round(x / safe[..., None]).clamp(-32, 31) + 32
    # a sub-block whose step is 0 keeps make_qx's codes in ggml; all-zero ones (the usual case) are 0 there
    q = torch.where(step[..., None] == 0, torch.zeros_like(q), q).to(torch.uint8).view(n, 2, 4, 32)
    ql = torch.cat([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4), (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], 2)
    # (n, 2, 64): per half of 128, values l and l + 64 share a byte, then l + 32 and l + 96
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    out = torch.cat([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(torch.uint8), d.view(torch.uint8)], 1)
    return out.reshape(w.shape[0], -1)


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v / ffn_down get 6 bits in Q4_K_M."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def q4_k_m_type(name: str, columns: int, layers: int, tied: bool) -> str:
    """The block type llama.cpp's Q4_K_M gives tensor `name` (a llama.cpp name) with rows of `columns` values."""
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        kind = "q6_k"
    elif name.startswith("blk.") and name.endswith(("attn_v.weight", "ffn_down.weight")):
        kind = "q6_k" if use_more_bits(int(name.split(".")[1]), layers) else "q4_k"
    else:
        kind = "q4_k"
    if columns % QK_K:
        kind = {"q4_k": "q5_0", "q6_k": "q8_0"}[kind]
    return kind


__all__ = ["QK_K", "q4_k_m_type", "quantize_q4_k", "quantize_q6_k", "use_more_bits"]
