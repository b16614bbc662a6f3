"""The one timing rule the benchmarks share: best of N runs (a shared machine only ever adds time)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_seconds(fn: Callable[[], object], repeats: int, warmup: int = 0) -> float:
    """Call `fn` `warmup` times untimed (allocations, compilation), then return the fastest of `repeats` calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
