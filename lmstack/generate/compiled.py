"""How generation compiles its step functions (the decode step, the speculative scorer).

On CPU the weights are frozen into the compiled graph. Inductor's `freezing` turns the parameters into
constants, which lets it pre-pack every weight matrix for its own C++ GEMM micro-kernels (`max_autotune`
with the CPP backend). At decode time the matmuls have 1-8 rows: MKL's sgemv/sgemm then reads the
weights well below the machine's copy bandwidth, and a decode step is little more than one read of
every weight, so the packed kernels, which read them much closer to that bandwidth, make the step several
times faster than plain torch.compile (measured figures: README, Benchmarks).

The price of freezing is that the weights are baked in: a frozen graph does not see a later change to
them, and the packed copies hold a second copy of the weight matrices while it lives. So a frozen graph
belongs to one (model, weights) snapshot: `compiled_for` fingerprints every parameter (storage pointer
and in-place version counter, which optimizer steps and `load_state_dict` bump) and compiles afresh
when the fingerprint changes. Dynamo caches compiled graphs on a function's code object, so each
snapshot compiles its own copy of the function's code; dropping the snapshot frees its graphs.

A frozen graph is also specialised to the KV-cache tensors it was compiled with (dynamo guards on their
identity), so compiled runs do not allocate a cache per call: `take_cache` hands out a cache kept for the
model per (rows, cache length, dtype, device) and `keep_cache` takes it back when the session ends, as
gpt-fast keeps its cache (two sessions open at once on one model get two caches). `release(model)`
frees the graphs and caches kept for a model.

CUDA (and any other device) gets plain `torch.compile(fullgraph=True, dynamic=False)`: weights stay
inputs, and GPU GEMMs at small batch do not have MKL's problem.
"""

from __future__ import annotations

import functools
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmstack.model.kv_cache import KVCache
from lmstack.model.protocol import CausalLM, model_device

# Inductor settings for a frozen CPU graph: weights as constants, packed for the C++ GEMM template.
# "CPP" alone, not "CPP,ATEN": autotuning against MKL costs compile time and on a busy machine can
# pick MKL's slower kernel; the template covers every matmul shape a decode step has.
FROZEN_CPU_INDUCTOR = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP"}

StepFn = Callable[..., torch.Tensor]

# Both keyed by model, so their entries go when the model does. _kept_caches holds the caches not in use.
_frozen: weakref.WeakKeyDictionary[nn.Module, dict[StepFn, tuple[tuple, StepFn]]] = weakref.WeakKeyDictionary()
_kept_caches: weakref.WeakKeyDictionary[nn.Module, dict[tuple, list[list[KVCache]]]] = weakref.WeakKeyDictionary()


def compiled_for(model: nn.Module, fn: StepFn) -> StepFn:
    """`fn(model, ...)` compiled for `model`: frozen on CPU (recompiled after its weights change), plain elsewhere."""
    if model_device(model).type != "cpu":
        return _compiled(fn)
    fingerprint = weights_fingerprint(model)
    snapshots = _frozen.setdefault(model, {})
    entry = snapshots.get(fn)
    if entry is None or entry[0] != fingerprint:
        entry = (fingerprint, _frozen_compile(fn))
        snapshots[fn] = entry
    return entry[1]


def take_cache(model: CausalLM, rows: int, cache_len: int) -> list[KVCache]:
    """Per-layer KV caches of this shape for a compiled session: a kept one that no open session uses, else
    a new one (given back with `keep_cache`)."""
    free = _kept_caches.setdefault(model, {}).setdefault(_cache_key(model, rows, cache_len), [])
    return free.pop() if free else model.make_cache(rows, cache_len)


def keep_cache(model: CausalLM, caches: list[KVCache]) -> None:
    """Take back caches from `take_cache` once their session has ended, for the next session of that shape."""
    rows, _, cache_len, _ = caches[0].k.shape
    _kept_caches.setdefault(model, {}).setdefault(_cache_key(model, rows, cache_len), []).append(caches)


def _cache_key(model: CausalLM, rows: int, cache_len: int) -> tuple:
    weight = next(model.parameters())
    return rows, cache_len, weight.dtype, weight.device


def release(model: nn.Module) -> None:
    """Free the compiled graphs and KV caches kept for `model`."""
    _frozen.pop(model, None)
    _kept_caches.pop(model, None)


def weights_fingerprint(model: nn.Module) -> tuple:
    """Changes whenever a parameter is replaced or modified in place (not through `.data`, which autograd
    does not version)."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


@functools.cache
def _compiled(fn: StepFn) -> StepFn:
    """`fn` compiled once per process (torch.compile then caches a graph per input shape)."""
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _frozen_compile(fn: StepFn) -> StepFn:
    """A torch.compile of a private copy of `fn`, run with freezing on. Freezing needs grad off when inductor
    compiles, and inductor reads its settings at compile time, which is any call that misses the cache
    (a new batch size or cache length), so every call runs under both."""
    private_copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                                      fn.__closure__)
    step = torch.compile(private_copy, fullgraph=True, dynamic=False)

    @functools.wraps(fn)
    def run(*args: Any) -> torch.Tensor:
        with torch.no_grad(), torch._inductor.config.patch(FROZEN_CPU_INDUCTOR):
            return step(*args)

    return run
