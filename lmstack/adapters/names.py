"""Module names as Hugging Face (and so peft) sees them, for each lmstack module an adapter can touch.

Llama, Mistral and Qwen2 use Hugging Face's names already: the map is the identity. GPT-2 differs: its
attention input is one fused Conv1D `transformer.h.N.attn.c_attn` where lmstack has q_proj, k_proj and
v_proj (the three thirds of c_attn's output, in that order), and the other names change:

    lmstack                               Hugging Face GPT-2
    model.layers.N.self_attn.{q,k,v}_proj transformer.h.N.attn.c_attn     (part 0, 1, 2 of the output)
    model.layers.N.self_attn.o_proj       transformer.h.N.attn.c_proj
    model.layers.N.mlp.up_proj            transformer.h.N.mlp.c_fc
    model.layers.N.mlp.down_proj          transformer.h.N.mlp.c_proj
    model.layers.N.{input,post_attention}_layernorm   transformer.h.N.ln_{1,2}
    model.embed_tokens / embed_positions / norm       transformer.wte / wpe / ln_f
"""

from __future__ import annotations

from lmstack.config import ModelConfig

_GPT2_BLOCK = {"self_attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj",
               "input_layernorm": "ln_1", "post_attention_layernorm": "ln_2"}
_GPT2_TOP = {"model.embed_tokens": "transformer.wte", "model.embed_positions": "transformer.wpe",
             "model.norm": "transformer.ln_f", "lm_head": "lm_head"}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def is_gpt2(config: ModelConfig) -> bool:
    return config.family == "gpt2"


def hf_module(name: str, config: ModelConfig) -> tuple[str, int | None]:
    """lmstack module name -> (Hugging Face module name, which third of a fused c_attn it is, or None)."""
    if not is_gpt2(config):
        return name, None
    if name in _GPT2_TOP:
        return _GPT2_TOP[name], None
    if name.startswith("model.layers."):
        _, _, layer, rest = name.split(".", 3)
        if rest in _QKV:
            return f"transformer.h.{layer}.attn.c_attn", _QKV.index(rest)
        if rest in _GPT2_BLOCK:
            return f"transformer.h.{layer}.{_GPT2_BLOCK[rest]}", None
    return name, None


def lmstack_modules(hf_name: str, config: ModelConfig) -> list[str]:
    """Hugging Face module name -> the lmstack module(s) it covers (three for GPT-2's c_attn)."""
    if not is_gpt2(config):
        return [hf_name]
    for ours, theirs in _GPT2_TOP.items():
        if hf_name == theirs:
            return [ours]
    if hf_name.startswith("transformer.h."):
        _, _, layer, rest = hf_name.split(".", 3)
        if rest == "attn.c_attn":
            return [f"model.layers.{layer}.{p}" for p in _QKV]
        for ours, theirs in _GPT2_BLOCK.items():
            if rest == theirs:
                return [f"model.layers.{layer}.{ours}"]
    return [hf_name]


def fused_conv1d(config: ModelConfig) -> bool:
    """Whether Hugging Face stores this family's linears as Conv1D, (d_in, d_out): peft's fan_in_fan_out."""
    return is_gpt2(config)


__all__ = ["fused_conv1d", "hf_module", "is_gpt2", "lmstack_modules"]
