"""`lmstack info`: parameters, memory at each precision, training memory and FLOPs per token of a preset or checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmstack.config import PRESETS, preset
from lmstack.interop.hf import read_config
from lmstack.model.cost import model_cost


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000 or prefix == "P":
            return f"{n:.3g} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000 if unit != "B" else 1024
    return f"{n} {unit}"


def _quantized_size(directory: str) -> dict | None:
    """Method, bytes and bytes per parameter of a quantized directory (lmstack quantize); None otherwise."""
    hf = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" not in hf:
        return None
    from lmstack.interop.hf import load_model
    from lmstack.quant.apply import model_nbytes

    nbytes, params = model_nbytes(load_model(directory))
    return {"method": hf["quantization_config"].get("method"), "bytes": nbytes, "bytes_per_parameter": nbytes / params}


def main(argv: list[str]) -> int:
    """Parameter count, memory (fp32/bf16/int8/int4), AdamW training memory and FLOPs/token of a preset or checkpoint."""
    parser = argparse.ArgumentParser(prog="lmstack info", description=main.__doc__)
    parser.add_argument("model", help=f"a model directory or a preset: {', '.join(sorted(PRESETS))}")
    parser.add_argument("--context", type=int, default=None, help="tokens of context for the FLOPs figure")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    config = read_config(args.model) if Path(args.model).is_dir() else preset(args.model)
    cost = model_cost(config, args.context)
    quantized = _quantized_size(args.model) if Path(args.model).is_dir() else None
    if args.json:
        print(json.dumps({"model": args.model, "config": config.to_dict(), **cost.__dict__,
                          **({"quantized": quantized} if quantized else {})}))
        return 0
    context = args.context or config.max_seq_len
    print(f"model            {args.model} ({config.family}: {config.num_layers} layers, width {config.hidden_size}, "
          f"{config.num_heads} heads / {config.num_kv_heads} kv heads, vocab {config.vocab_size})")
    print(f"parameters       {cost.parameters:,} ({cost.non_embedding_parameters:,} without embeddings)")
    for precision, nbytes in cost.weights_bytes.items():
        print(f"weights {precision:<8} {_human(nbytes)}")
    if quantized:
        print(f"quantized        {quantized['method']}: {_human(quantized['bytes'])} as stored, "
              f"{quantized['bytes_per_parameter']:.3f} bytes/parameter (scales and zero points included)")
    print(f"train (AdamW)    {_human(cost.adamw_training_bytes)} for fp32 weights, grads and moments, "
          f"+ ~{_human(cost.activation_bytes_per_token)} activations per token in a batch")
    print(f"FLOPs / token    forward {_human(cost.forward_flops_per_token, 'FLOP')}, "
          f"training {_human(cost.training_flops_per_token, 'FLOP')} (6N + attention at context {context})")
    return 0
