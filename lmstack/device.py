"""Devices and the one precision policy, for training, generation, evaluation and serving alike.

Policy (DESIGN.md): fp32 on the CPU; bf16 autocast with fp32 master weights on CUDA. A CPU without
native bf16 instructions (AVX-512 BF16 or AMX) emulates bf16 matmuls, far slower than fp32, so asking
for bf16 there is refused with the reason rather than silently slow.

    device = resolve_device("auto")                  # cuda:local_rank when available, else cpu
    dtype = resolve_precision("auto", device)        # None (plain fp32) or torch.bfloat16
    with autocast(device, dtype): ...
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from lmstack.errors import DeviceError


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matmul instructions (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
        return " avx512_bf16" in flags or " amx_bf16" in flags
    except OSError:  # not Linux: ask oneDNN
        with contextlib.suppress(Exception):
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_device(choice: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """"auto" (or None) -> this process's GPU when CUDA is available, else the CPU; "cpu", "cuda", "cuda:N" as
    given. An unknown device or CUDA on a CPU-only torch is a DeviceError naming the choice."""
    if isinstance(choice, torch.device):
        choice = str(choice)
    choice = "auto" if choice is None else choice
    if choice not in ("auto", "cpu", "cuda") and not choice.startswith("cuda:"):
        raise DeviceError(f"unknown device {choice!r}: use auto, cpu, cuda or cuda:N")
    if choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {choice!r}: torch.cuda.is_available() is False (CPU-only torch build or no "
                              "visible GPU); use cpu")
        index = choice.split(":", 1)[1]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise DeviceError(f"device {choice!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(choice)
    if choice == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda': torch.cuda.is_available() is False (CPU-only torch build "
                          "or no visible GPU); use cpu")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision choice ("auto", "fp32", "bf16") on `device`; None = plain fp32.
    "auto" is fp32 on the CPU and bf16 on CUDA."""
    if choice == "fp32" or (choice == "auto" and device.type == "cpu"):
        return None
    if device.type == "cpu" and not cpu_has_native_bf16():
        raise DeviceError("precision bf16 refused: this CPU has no native bf16 instructions (no AVX-512 BF16 "
                          "or AMX), so bf16 matmuls are emulated and run ~100x slower than fp32. "
                          "Use fp32 (the CPU default)")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"precision bf16: {torch.cuda.get_device_name(device)} does not support bf16")
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device`, or a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
