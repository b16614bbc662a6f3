"""Training on this machine: the CPU allocator setting and the FLOP/s peak used for MFU.

The device and precision policy itself is `lmstack.device` (shared with generation and serving).
"""

from __future__ import annotations

import time

import torch

from lmstack.model.linear import nt_matmul

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_cpu_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next step instead of handing it back to the OS.

    Why: by default a CPU tensor over glibc's mmap threshold (at most 32 MiB) is a fresh mmap each
    time it is allocated, and a large free block at the top of the heap is trimmed back to the OS; every
    training step then page-faults its big activations in again, 4 KiB at a time (tens of thousands of
    faults a step for a small model; the measured cost is in the README's benchmark section). Blocks up
    to 256 MiB now come from the heap, and up to 1 GiB of free heap is kept: the CPU counterpart of
    CUDA's caching allocator. Resident
    memory then stays at its high-water mark, which a training run reaches every step anyway.
    Returns False where there is no glibc (macOS, musl), which keeps the default behaviour.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 256 * 2**20)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**30))


# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' data sheets.
_CUDA_BF16_PEAKS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
                    "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def measure_cpu_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
    """This machine's fp32 GEMM FLOP/s: the best of `repeats` (size x size) products, through MKL (torch's
    matmul) and through oneDNN (the library the model's training linears use, faster on some CPUs), so
    that the training step cannot beat its own "peak"."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for product in (torch.matmul, nt_matmul):
        product(a, b)  # warm up the library's threads
        for _ in range(repeats):
            start = time.perf_counter()
            product(a, b)
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """Per-device peak FLOP/s for MFU: measured fp32 GEMM on CPU, the data-sheet bf16 peak on known GPUs."""
    if device.type == "cpu":
        return measure_cpu_matmul_flops()
    if dtype is torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        for key, flops in _CUDA_BF16_PEAKS.items():
            if key in name:
                return flops
    return None
