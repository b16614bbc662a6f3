"""An int4 weight x bf16 activation kernel for decode steps (a few rows) on CPUs with AVX-512 BF16.

Batch-1 decode reads every weight once per token, so its speed is bytes per weight over the rate the kernel
turns bytes into products. torch's int4 kernels (and inductor's int4 GEMM template) dequantize each nibble to
fp32 through a lookup table and an FMA before the product: about 16 vector instructions per 64 weights,
which makes them compute-bound at batch 1 here, no faster per layer than int8. This kernel multiplies in the
integer domain of the codes instead, two products per fp32 lane with `vdpbf16ps` (AVX512_BF16):

    y[n] = sum_g s[n,g] * (sum_{k in g} x[k] * (128 + q[n,k]) - (128 + z[n,g]) * sum_{k in g} x[k])

- (128 + q) as bf16 is exact (8 bits of mantissa cover 128..143) and costs no table: it is the code OR'ed
  into the bits of bf16 128.0 (0x4300); the 128 and the zero point come back out once per group, through
  sum_k x[k]; the products are exact and summed in fp32 (the rounding of x to bf16 is the only one, as in
  torch's kernels, and y is fp32).
- Layout (built at load time from the stored codes, never saved): `packed` (N/16, K/8, 16) 32-bit words, word
  (b, r, i) holding the 8 codes of row n = 16 b + i for k = 8 r .. 8 r + 7, code j at bit (0, 16, 4, 20, 8,
  24, 12, 28)[j]: one shift by 4p and one three-way logic op put codes 2p and 2p + 1 of 16 rows in the low
  and high halves of 16 lanes, the two bf16 operands `vdpbf16ps` pairs with x[k], x[k+1]. `scales` (N/16,
  G, 2, 16) fp32: s and s * (128 + z) for 16 rows, read once per group. N is padded to a multiple of 16.
  So about 3 instructions per 32 weights, against the lookup kernels' 8.
- The C++ is compiled on first use by inductor's own C++ toolchain (the compiler a compiled decode step already
  needs), cached on disk like inductor's kernels, and parallel over blocks of 64 rows with OpenMP.

`available()` says whether this process can use it (x86-64 with avx512_bf16 and avx512bw in /proc/cpuinfo, and
the kernel compiled); everywhere else IntLinear keeps torch's kernels.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

# Rows (tokens) up to which the kernel runs: it reads the weights once per row, which beats a GEMM only for a
# few rows; prefill goes to torch's kernels.
MAX_ROWS = 4
_POSITIONS = (0, 16, 4, 20, 8, 24, 12, 28)  # bit of code j in a word (see the module docstring)

_SOURCE = r"""
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <vector>

// U blocks of 16 rows: W (U, K/8, 16) words at stride wstride, SC (U, G, 2, 16) fp32 at stride sstride.
template <int U>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static inline void rows16(const uint32_t* W, const float* SC, const uint32_t* X2, const float* XS, float* Y,
                          int64_t valid, int64_t K, int64_t G, int64_t gs) {
  const __m512i low4 = _mm512_set1_epi32(0x000F000F), bf16_128 = _mm512_set1_epi32(0x43004300);
  const int64_t wstride = K / 8 * 16, sstride = G * 32, words_per_group = gs / 8;
  __m512 y[U];
  for (int u = 0; u < U; ++u) y[u] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[U];
    for (int u = 0; u < U; ++u) acc[u] = _mm512_setzero_ps();
    for (int64_t r = g * words_per_group; r < (g + 1) * words_per_group; ++r) {
      __m512i d[U];
      for (int u = 0; u < U; ++u) d[u] = _mm512_loadu_si512(W + u * wstride + r * 16);
      for (int p = 0; p < 4; ++p) {
        const __m512i xpair = _mm512_set1_epi32(X2[r * 4 + p]);  // bf16 x[8r + 2p], x[8r + 2p + 1]
        for (int u = 0; u < U; ++u) {
          // (d >> 4p) & 0x000F000F | 0x43004300: bf16 128 + q in each half
          const __m512i w = _mm512_ternarylogic_epi32(_mm512_srli_epi32(d[u], 4 * p), low4, bf16_128, 0xEA);
          acc[u] = _mm512_dpbf16_ps(acc[u], (__m512bh)w, (__m512bh)xpair);
        }
      }
    }
    const __m512 xs = _mm512_set1_ps(XS[g]);
    for (int u = 0; u < U; ++u) {
      const float* sc = SC + u * sstride + g * 32;
      y[u] = _mm512_fmadd_ps(acc[u], _mm512_loadu_ps(sc), y[u]);
      y[u] = _mm512_fnmadd_ps(_mm512_loadu_ps(sc + 16), xs, y[u]);
    }
  }
  for (int u = 0; u < U; ++u) {
    const int64_t n = valid - u * 16;
    if (n >= 16) _mm512_storeu_ps(Y + u * 16, y[u]);
    else if (n > 0) _mm512_mask_storeu_ps(Y + u * 16, (__mmask16)((1u << n) - 1), y[u]);
  }
}

static inline uint16_t to_bf16(float v) {  // round to nearest even, as torch's .to(torch.bfloat16)
  uint32_t bits; std::memcpy(&bits, &v, 4);
  if ((bits & 0x7fffffff) > 0x7f800000) return uint16_t((bits >> 16) | 0x40);  // NaN stays NaN
  return uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

// X (M, K) fp32 -> Y (M, N) fp32.
extern "C" void kernel(const uint32_t* W, const float* SC, const float* X, float* Y,
                       int64_t M, int64_t N, int64_t K, int64_t gs, int64_t threads) {
  const int64_t G = K / gs, blocks = (N + 15) / 16, chunks = (blocks + 3) / 4;
  std::vector<uint16_t> xb(M * K);
  std::vector<float> xsum(M * G);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
        const uint16_t h = to_bf16(X[m * K + k]);
        const uint32_t bits = uint32_t(h) << 16;
        float v; std::memcpy(&v, &bits, 4);
        xb[m * K + k] = h; s += v;
      }
      xsum[m * G + g] = s;
    }
  #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1 && chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t b = c * 4, u = blocks - b < 4 ? blocks - b : 4;
    for (int64_t m = 0; m < M; ++m) {
      const uint32_t* W0 = W + b * (K / 8) * 16;
      const float* SC0 = SC + b * G * 32;
      const uint32_t* X2 = reinterpret_cast<const uint32_t*>(xb.data() + m * K);
      float* Y0 = Y + m * N + b * 16;
      const int64_t valid = N - b * 16;
      switch (u) {
        case 4: rows16<4>(W0, SC0, X2, xsum.data() + m * G, Y0, valid, K, G, gs); break;
        case 3: rows16<3>(W0, SC0, X2, xsum.data() + m * G, Y0, valid, K, G, gs); break;
        case 2: rows16<2>(W0, SC0, X2, xsum.data() + m * G, Y0, valid, K, G, gs); break;
        default: rows16<1>(W0, SC0, X2, xsum.data() + m * G, Y0, valid, K, G, gs);
      }
    }
  }
}
"""


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


@functools.cache
def _kernel():
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    argtypes = ["const uint32_t*", "const float*", "const float*", "float*"] + ["int64_t"] * 5
    return CppPythonBindingsCodeCache.load_pybinding(argtypes, _SOURCE)


@functools.cache
def available() -> bool:
    """Whether this process runs the kernel: an x86-64 CPU with AVX512_BF16 and AVX512BW, and the kernel built."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not {"avx512_bf16", "avx512bw"} <= _cpu_flags():
        return False
    try:
        _kernel()
    except Exception as error:  # no C++ compiler, or one without these intrinsics: torch's kernels instead
        logging.getLogger(__name__).warning("int4 decode kernel unavailable (%s); using torch's int4 kernel", error)
        return False
    return True


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (N, K) uint8 in [0, 15], scales (N, G) fp32, zeros (N, G) -> the kernel's (packed, scales)."""
    N, K = codes.shape
    pad = -N % 16
    blocks, G = (N + pad) // 16, K // group_size
    codes = F.pad(codes.long(), (0, 0, 0, pad)).view(blocks, 16, K // 8, 8).transpose(1, 2)  # (B, K/8, 16, 8)
    words = (codes << torch.tensor(_POSITIONS)).sum(-1)  # (B, K/8, 16), each below 2^32
    packed = (words - (words >> 31 << 32)).to(torch.int32).contiguous()  # the same 32 bits, as int32
    s = F.pad(scales.float(), (0, 0, 0, pad))
    c = F.pad(scales.float() * (128 + zeros.float()), (0, 0, 0, pad))
    sc = torch.stack([s, c], 1).view(blocks, 16, 2, G).permute(0, 3, 2, 1).contiguous()  # (B, G, 2, 16)
    return packed, sc


def _int4_gemv_cpu(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int,
                   out_features: int) -> torch.Tensor:
    x = x.contiguous()
    y = x.new_empty(x.shape[0], out_features)
    _kernel()(packed, scales, x, y, x.shape[0], out_features, x.shape[1], group_size, torch.get_num_threads())
    return y


# A plain library op, not @torch.library.custom_op: a compiled decode step calls it ~60 times per token, and
# custom_op's Python dispatch measured 25-50 us a call here against 5-10 us for this one. No autograd: IntLinear
# sends inputs that require grad elsewhere.
_LIB = torch.library.Library("lmstack", "FRAGMENT")
_LIB.define("int4_bf16_gemv(Tensor x, Tensor packed, Tensor scales, int group_size, int out_features) -> Tensor")
_LIB.impl("int4_bf16_gemv", _int4_gemv_cpu, "CPU")


@torch.library.register_fake("lmstack::int4_bf16_gemv")
def _(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int,
      out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int,
              out_features: int) -> torch.Tensor:
    """x (M, K) fp32, M <= MAX_ROWS, times the int4 weight in `pack`'s layout -> (M, N) fp32 (x rounded to bf16)."""
    return torch.ops.lmstack.int4_bf16_gemv(x, packed, scales, group_size, out_features)


__all__ = ["MAX_ROWS", "available", "int4_gemv", "pack"]
