"""What a model costs: parameters, memory at each precision, training memory, FLOPs per token (`lmstack info`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmstack.config import ModelConfig
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
