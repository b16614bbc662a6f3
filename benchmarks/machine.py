"""What a benchmark ran on: CPU model, the SIMD flags that matter for GEMMs, torch's thread count (detected, never assumed)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def machine() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return {"cpu": model, "cpu_flags": [f for f in _FLAGS if f in flags], "threads": torch.get_num_threads(),
            "torch": torch.__version__}
