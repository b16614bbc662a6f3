"""`lmstack info`: what a model costs — parameters, memory at each precision, training memory, FLOPs per token."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lmstack.config import PRESETS, ModelConfig, preset
from lmstack.interop.hf import read_config
from lmstack.model.transformer import Transformer


@dataclass
class ModelCost:
    parameters: int
    non_embedding_parameters: int
    weights_bytes: dict[str, int]
    adamw_training_bytes: int  # fp32 weights + grads + two AdamW moments, before activations
    activation_bytes_per_token: int  # fp32, no checkpointing, rough: what backward keeps per token
    forward_flops_per_token: int
    training_flops_per_token: int  # 6N + attention, at full context


def model_cost(config: ModelConfig, context: int | None = None) -> ModelCost:
    """Count on the meta device (no memory) and apply the standard estimates (Kaplan / PaLM appendix B)."""
    with torch.device("meta"):
        model = Transformer(config)
    n = model.num_parameters()
    n_matmul = model.num_parameters(exclude_embeddings=True)
    if config.tie_word_embeddings:  # the tied head is still a matmul per token
        n_matmul += config.vocab_size * config.hidden_size
    t = context or config.max_seq_len
    # attention scores + weighted sum: 2 matmuls of (T x D) per head per layer, 2 FLOPs per MAC, causal average T/2
    attn_forward = 2 * 2 * config.num_layers * config.num_heads * config.head_dim * t // 2
    forward = 2 * n_matmul + attn_forward
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_layers
    # saved activations per token per layer: residual, norms, q/k/v/o, attention output, MLP hidden (x3 for SwiGLU)
    per_layer = 4 * (6 * d + 2 * config.num_kv_heads * config.head_dim + (3 if config.mlp_kind == "swiglu" else 2) * f)
    return ModelCost(
        parameters=n, non_embedding_parameters=model.num_parameters(exclude_embeddings=True),
        weights_bytes={"fp32": 4 * n, "bf16": 2 * n, "int8": n, "int4": n // 2},
        adamw_training_bytes=16 * n, activation_bytes_per_token=layers * per_layer + 4 * config.vocab_size,
        forward_flops_per_token=forward, training_flops_per_token=3 * forward,
    )


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000 or prefix == "P":
            return f"{n:.3g} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000 if unit != "B" else 1024
    return f"{n} {unit}"


def main(argv: list[str]) -> int:
    """Parameter count, memory (fp32/bf16/int8/int4), AdamW training memory and FLOPs/token of a preset or checkpoint."""
    parser = argparse.ArgumentParser(prog="lmstack info", description=main.__doc__)
    parser.add_argument("model", help=f"a model directory or a preset: {', '.join(sorted(PRESETS))}")
    parser.add_argument("--context", type=int, default=None, help="tokens of context for the FLOPs figure")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    config = read_config(args.model) if Path(args.model).is_dir() else preset(args.model)
    cost = model_cost(config, args.context)
    if args.json:
        print(json.dumps({"model": args.model, "config": config.to_dict(), **cost.__dict__}))
        return 0
    context = args.context or config.max_seq_len
    print(f"model            {args.model} ({config.family}: {config.num_layers} layers, width {config.hidden_size}, "
          f"{config.num_heads} heads / {config.num_kv_heads} kv heads, vocab {config.vocab_size})")
    print(f"parameters       {cost.parameters:,} ({cost.non_embedding_parameters:,} without embeddings)")
    for precision, nbytes in cost.weights_bytes.items():
        print(f"weights {precision:<8} {_human(nbytes)}")
    print(f"train (AdamW)    {_human(cost.adamw_training_bytes)} for fp32 weights, grads and moments, "
          f"+ ~{_human(cost.activation_bytes_per_token)} activations per token in a batch")
    print(f"FLOPs / token    forward {_human(cost.forward_flops_per_token, 'FLOP')}, "
          f"training {_human(cost.training_flops_per_token, 'FLOP')} (6N + attention at context {context})")
    return 0
