"""`quantize_model`: one method applied to a model's linear leaves, each swapped by name for its quantized module.

The model stays a `Transformer` (principle 3): only `model.layers.N.self_attn.q_proj`-style leaves change
class, so generation, evaluation and saving call it as before. The LM head and the embeddings stay in
full precision by default (as GPTQ, AWQ and bitsandbytes leave them): they are a small share of the bytes
of a large model, and the head's errors land directly on the logits.

    cfg = QuantConfig(method="gptq", bits=4, group_size=128)
    report = quantize_model(model, cfg, calib_tokens)      # tokens (n, T): needed by gptq / awq / smoothquant
    report.bytes_per_parameter, model.quantization_config   # the latter is what a saved directory records
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lmstack.errors import ConfigError
from lmstack.quant.formats import SUPPORTED_BITS, check_group_size, quantize_rtn
from lmstack.quant.linear import QUANTIZED_MODULES, Int8DynamicLinear, IntLinear, NF4Linear, swap_module, target_linears
from lmstack.quant.nf4 import quantize_nf4

METHODS = ("rtn", "nf4", "fp4", "gptq", "awq", "smoothquant", "dynamic", "qat")
NEEDS_CALIBRATION = ("gptq", "awq", "smoothquant")


@dataclass
class QuantConfig:
    """What `lmstack quantize` does; the CLI's flags are these fields."""

    method: str = "rtn"
    bits: int = 4  # rtn / gptq / awq / qat: 8, 4 or 3
    group_size: int | None = 128  # None: one scale per output channel
    symmetric: bool = False  # rtn / gptq / qat: absmax scales with a fixed zero point (int8 kernels need it)
    block_size: int = 64  # nf4 / fp4
    double_quant: bool = True  # nf4 / fp4
    damp: float = 0.01  # gptq: fraction of the mean Hessian diagonal added to it
    act_order: bool = False  # gptq: columns by decreasing Hessian diagonal (with static groups)
    alpha: float = 0.5  # smoothquant's migration strength
    awq_grid: int = 20  # awq: alphas 0, 1/grid, ... (grid-1)/grid
    awq_clip: bool = True  # awq: search a clipping ratio per layer after scaling
    include_head: bool = False  # also quantize lm_head (a tied one as its own copy; the embedding stays)
    bits_per_layer: dict[str, int] = field(default_factory=dict)  # mixed precision: full name -> bits

    def check(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method}: unknown; choose one of {', '.join(METHODS)}")
        if self.method in ("rtn", "gptq", "awq", "qat") and self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"--bits {self.bits}: {self.method} supports {', '.join(map(str, SUPPORTED_BITS))}")
        for name, bits in self.bits_per_layer.items():
            if bits not in SUPPORTED_BITS:
                raise ConfigError(f"bits_per_layer[{name}] = {bits}: choose one of {SUPPORTED_BITS}")
        if self.group_size is not None and self.group_size <= 0:
            raise ConfigError(f"--group-size {self.group_size}: give a positive size, or 0 for per channel")


@dataclass
class QuantReport:
    method: str
    layers: int
    quantized_parameters: int
    total_parameters: int
    model_bytes: int
    quantized_bytes: int
    seconds: float

    @property
    def bytes_per_parameter(self) -> float:
        """Bytes of the whole model (quantized layers with their scales and zero points, the rest as stored)
        per parameter."""
        return self.model_bytes / self.total_parameters

    @property
    def quantized_bytes_per_parameter(self) -> float:
        """Bytes per parameter of the quantized layers alone (codes + scales + zero points)."""
        return self.quantized_bytes / max(self.quantized_parameters, 1)


def model_nbytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of everything stored, parameter count): quantized modules count their packed bytes and
    parameters their dtype's size; tied weights once."""
    seen: set[int] = set()
    total_bytes, total_params = 0, 0
    config = getattr(model, "config", None)
    copied_head = getattr(model, "lm_head", None) if getattr(config, "tie_word_embeddings", False) else None
    for module in model.modules():
        if isinstance(module, QUANTIZED_MODULES):
            total_bytes += module.nbytes()
            if module is not copied_head:  # a tied head's quantized copy: extra bytes, not extra parameters
                total_params += module.in_features * module.out_features + (
                    0 if module.bias is None else module.bias.numel())
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total_bytes += p.numel() * p.element_size()
            total_params += p.numel()
    return total_bytes, total_params


def bits_for(cfg: QuantConfig, targets: dict[str, nn.Linear]) -> dict[str, int]:
    return {name: cfg.bits_per_layer.get(name, cfg.bits) for name in targets}


def quantize_model(model: nn.Module, cfg: QuantConfig, calib_tokens: torch.Tensor | None = None,
                   batch_size: int = 8) -> QuantReport:
    """Quantize `model` in place with `cfg`; returns sizes and time. Calibration windows (n, T) are needed
    by gptq, awq and smoothquant (a ConfigError otherwise)."""
    cfg.check()
    start = time.perf_counter()
    targets = target_linears(model, cfg.include_head)
    if cfg.method in NEEDS_CALIBRATION and calib_tokens is None:
        raise ConfigError(f"--method {cfg.method} needs calibration text (--calib FILE|DIR|builtin:python-docs)")
    if cfg.method in ("rtn", "gptq", "awq", "qat"):
        for name, linear in targets.items():
            check_group_size(name, linear.in_features, cfg.group_size)
            if bits_for(cfg, targets)[name] == 3 and linear.in_features % 8:
                raise ConfigError(f"{name}: int3 packs 8 values in 3 bytes; input size {linear.in_features} "
                                  f"is not a multiple of 8")
    quantized_params = sum(m.weight.numel() for m in targets.values())
    if cfg.method == "rtn":
        for name, linear in targets.items():
            w = quantize_rtn(linear.weight, bits_for(cfg, targets)[name], cfg.group_size, cfg.symmetric)
            swap_module(model, name, IntLinear.from_weight(w, linear.bias))
    elif cfg.method in ("nf4", "fp4"):
        for name, linear in targets.items():
            w = quantize_nf4(linear.weight, cfg.block_size, cfg.double_quant, cfg.method)
            swap_module(model, name, NF4Linear.from_weight(w, linear.bias))
    elif cfg.method == "gptq":
        from lmstack.quant.gptq import gptq_model
        weights = gptq_model(model, calib_tokens, bits_for(cfg, targets), cfg.group_size, cfg.symmetric, cfg.damp,
                             cfg.act_order, batch_size)
        for name, w in weights.items():
            swap_module(model, name, IntLinear.from_weight(w, targets[name].bias))
    elif cfg.method == "awq":
        from lmstack.quant.awq import awq_model
        weights = awq_model(model, calib_tokens, bits_for(cfg, targets), cfg.group_size, cfg.awq_grid, cfg.awq_clip,
                            batch_size)
        for name, w in weights.items():
            swap_module(model, name, IntLinear.from_weight(w, targets[name].bias))
    elif cfg.method in ("smoothquant", "dynamic"):
        if cfg.method == "smoothquant":
            from lmstack.quant.smoothquant import smooth_model
            smooth_model(model, calib_tokens, cfg.alpha, batch_size)
        for name, linear in targets.items():
            swap_module(model, name, Int8DynamicLinear.from_float(linear.weight, linear.bias))
    elif cfg.method == "qat":
        from lmstack.quant.qat import convert_qat
        convert_qat(model)
    model.quantization_config = quantization_config(cfg)
    total_bytes, total_params = model_nbytes(model)
    quantized_bytes = sum(m.nbytes() for m in model.modules() if isinstance(m, QUANTIZED_MODULES))
    return QuantReport(cfg.method, len(targets), quantized_params, total_params, total_bytes, quantized_bytes,
                       time.perf_counter() - start)


FORMAT_VERSION = 1


def quantization_config(cfg: QuantConfig) -> dict:
    """What config.json records under `quantization_config` (the per-module layout is added when saving)."""
    return {"quant_method": "lmstack", "format_version": FORMAT_VERSION, **asdict(cfg)}


__all__ = ["FORMAT_VERSION", "METHODS", "QuantConfig", "QuantReport", "model_nbytes", "quantization_config",
           "quantize_model"]
