"""Per-input-channel scales folded into the operation before a linear: what AWQ and SmoothQuant share.

For a linear y = x W^T whose input x comes straight from a norm's gain (or a linear's output rows),
dividing that producer's channel j by s_j and multiplying W's column j by s_j leaves y unchanged:
x' = x / s, W' = W diag(s). The quantization error then moves between the activations and the weights.

The producer -> consumers pairs in a decoder block (Llama names):
- input_layernorm -> q_proj, k_proj, v_proj
- v_proj -> o_proj, when H = H_kv (v's output channels are o's input channels one to one; under GQA
  one v channel feeds several heads' slots and the fold does not exist)
- post_attention_layernorm -> gate_proj, up_proj (up_proj alone for a plain MLP)
- up_proj -> down_proj, SwiGLU only (silu(gate) * up is linear in up; GELU(up) is not)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ScaleGroup:
    producer: str  # name within the block of the norm / linear whose output channels get divided
    consumers: list[str]  # linears reading that output, whose input columns get multiplied


def scale_groups(block: nn.Module) -> list[ScaleGroup]:
    attn, mlp = block.self_attn, block.mlp
    groups = [ScaleGroup("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])]
    if attn.num_heads == attn.num_kv_heads:
        groups.append(ScaleGroup("self_attn.v_proj", ["self_attn.o_proj"]))
    if mlp.kind == "swiglu":
        groups += [ScaleGroup("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
                   ScaleGroup("mlp.up_proj", ["mlp.down_proj"])]
    else:
        groups.append(ScaleGroup("post_attention_layernorm", ["mlp.up_proj"]))
    return groups


@torch.no_grad()
def fold_scales(block: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Divide the producer's output channels by s (K,) and multiply the consumers' input columns by s."""
    modules = dict(block.named_modules())
    producer = modules[group.producer]
    if isinstance(producer, nn.Linear):
        producer.weight.div_(s[:, None])  # (K, in): output rows
    else:  # RMSNorm / LayerNorm gain (and bias)
        producer.weight.div_(s)
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(s)
    for name in group.consumers:
        modules[name].weight.mul_(s[None, :])  # (N, K): input columns


__all__ = ["ScaleGroup", "fold_scales", "scale_groups"]
