"""The `qat:` section of a pretrain / finetune config: quantization-aware training inside a training run.

    qat:
      bits: 4             # 8, 4 or 3
      group_size: 128     # null: one scale per output channel
      symmetric: false
      layers: []          # names or name suffixes (q_proj, mlp.down_proj, ...); empty: every block linear

Before training, the chosen linears become `FakeQuantLinear` (lmstack.quant.qat: same parameters, the
forward sees the weight rounded exactly as RTN will store it, straight-through gradient), so the engine,
its optimizer and its checkpoints see an ordinary model: every checkpoint holds the fp32 latent weights.
After the last step the recipe converts them and writes OUT/quantized/, a quantized lmstack directory
(`lmstack chat --model OUT/quantized`). Any checkpoint of the run converts to the same thing with
`lmstack quantize --model OUT/checkpoints/step-N --method rtn` and the section's bits / group size /
symmetric (converting is RTN of the latent weights: lmstack.quant.qat.convert_qat).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lmstack.errors import ConfigError
from lmstack.quant.apply import QuantConfig, quantization_config
from lmstack.quant.checkpoint import save_quantized
from lmstack.quant.formats import SUPPORTED_BITS
from lmstack.quant.linear import target_linears
from lmstack.quant.qat import convert_qat, prepare_qat
from lmstack.train.config import QATConfig


def apply_qat(model: nn.Module, cfg: QATConfig) -> list[str]:
    """Swap the section's linears for fake-quantized ones, in place; -> their names."""
    if cfg.bits not in SUPPORTED_BITS:
        raise ConfigError(f"qat.bits: {cfg.bits}; choose one of {', '.join(map(str, SUPPORTED_BITS))}")
    if cfg.group_size is not None and cfg.group_size <= 0:
        raise ConfigError(f"qat.group_size: {cfg.group_size}; give a positive size, or null for per channel")
    names = list(target_linears(model))
    if cfg.layers:
        chosen = [n for n in names if any(n == pattern or n.endswith("." + pattern) for pattern in cfg.layers)]
        unmatched = [p for p in cfg.layers if not any(n == p or n.endswith("." + p) for n in names)]
        if unmatched:
            raise ConfigError(f"qat.layers: {', '.join(unmatched)} match no block linear (e.g. {names[0]}, "
                              f"or a suffix such as {names[0].rsplit('.', 1)[-1]})")
        names = chosen
    return prepare_qat(model, cfg.bits, cfg.group_size, cfg.symmetric, names)


def write_quantized(model: nn.Module, cfg: QATConfig, out: str | Path, source_dir: str | Path | None) -> Path:
    """Convert the fake-quantized linears of the trained `model` to int weights (in place) and save the
    quantized directory at `out` (tokenizer files from `source_dir`)."""
    convert_qat(model)
    model.quantization_config = quantization_config(QuantConfig("qat", cfg.bits, cfg.group_size, cfg.symmetric))
    return save_quantized(model, out, source_dir)


__all__ = ["QATConfig", "apply_qat", "write_quantized"]
