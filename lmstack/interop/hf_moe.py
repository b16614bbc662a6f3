"""Mixtral and Qwen2-MoE config.json and tensor names <-> lmstack's Transformer with a MoEConfig.

A mixture-of-experts checkpoint is the decoder plus experts: Mixtral is Mistral's (or, without a
sliding window, Llama's) config with `num_local_experts`, Qwen2-MoE is Qwen2's with a sigmoid-gated
shared expert. So the config is read as its dense base family (lmstack.interop.hf_config) plus the
keys below, and written the same way. Tensor names: Qwen2-MoE's are lmstack's
(`mlp.gate`, `mlp.experts.N.{gate,up,down}_proj`, `mlp.shared_expert.*`, `mlp.shared_expert_gate`);
Mixtral's `block_sparse_moe.experts.N.{w1,w3,w2}` are renamed to them and back.
"""

from __future__ import annotations

import re
from typing import Any

from lmstack.config import ModelConfig, MoEConfig
from lmstack.errors import ConfigError

ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
# transformers' defaults for the keys a config.json may leave out (MixtralConfig, Qwen2MoeConfig)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": dict(rms_norm_eps=1e-5, max_position_embeddings=4096 * 32, rope_theta=1e6, bos_token_id=1,
                    eos_token_id=2, num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001),
    "qwen2_moe": dict(rms_norm_eps=1e-6, max_position_embeddings=32768, num_experts=60, num_experts_per_tok=4,
                      moe_intermediate_size=1408, shared_expert_intermediate_size=5632, norm_topk_prob=False,
                      router_aux_loss_coef=0.001, intermediate_size=5632),
}


def base_family(hf: dict[str, Any]) -> str:
    """The dense family whose reader takes the non-expert keys: mistral for a windowed Mixtral, llama otherwise."""
    if hf["model_type"] == "qwen2_moe":
        return "qwen2"
    return "mistral" if hf.get("sliding_window") else "llama"


def split_hf(hf: dict[str, Any], source: str) -> tuple[dict[str, Any], MoEConfig]:
    """A Mixtral / Qwen2-MoE config.json -> (the dense base family's config.json, the MoEConfig)."""
    model_type = hf["model_type"]
    full = {**_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}
    if full.get("router_jitter_noise"):
        raise ConfigError(f"{source}: router_jitter_noise {full['router_jitter_noise']} is not supported (training "
                          "noise on the router's input); set it to 0")
    if model_type == "mixtral":
        moe = MoEConfig(num_experts=int(full["num_local_experts"]), num_experts_per_tok=int(full["num_experts_per_tok"]),
                        normalize_topk=True, router_aux_loss_coef=float(full["router_aux_loss_coef"]))
    else:
        if full.get("mlp_only_layers") or int(full.get("decoder_sparse_step", 1)) != 1:
            raise ConfigError(f"{source}: dense layers among the expert layers (mlp_only_layers, decoder_sparse_step) "
                              "are not supported; every layer must hold experts")
        if full.get("qkv_bias") is False:
            raise ConfigError(f"{source}: qkv_bias false is not supported for qwen2_moe")
        moe = MoEConfig(num_experts=int(full["num_experts"]), num_experts_per_tok=int(full["num_experts_per_tok"]),
                        intermediate_size=int(full["moe_intermediate_size"]),
                        normalize_topk=bool(full["norm_topk_prob"]),
                        shared_expert_intermediate_size=int(full["shared_expert_intermediate_size"]),
                        router_aux_loss_coef=float(full["router_aux_loss_coef"]))
    base = {**full, "model_type": base_family(hf)}
    base.pop("lmstack", None)  # a copy lmstack wrote describes the whole MoE model, not the dense base
    return base, moe


def incompatibility(config: ModelConfig) -> str | None:
    """Why an MoE config cannot be written as its family's Hugging Face architecture, or None."""
    moe = config.moe
    if config.family not in ARCHITECTURES or not moe.num_experts:
        return "experts need family mixtral or qwen2_moe (and a family mixtral / qwen2_moe needs experts)"
    if config.family == "mixtral" and (not moe.normalize_topk or moe.shared_expert_intermediate_size):
        return "mixtral renormalises its top-k weights (normalize_topk true) and has no shared expert"
    if config.family == "qwen2_moe" and not moe.shared_expert_intermediate_size:
        return "qwen2_moe has a shared expert (shared_expert_intermediate_size > 0)"
    return None


def base_config(config: ModelConfig) -> ModelConfig:
    """The dense config whose Hugging Face keys an MoE config shares (experts removed)."""
    family = "qwen2" if config.family == "qwen2_moe" else ("mistral" if config.sliding_window else "llama")
    return config.replace(family=family, moe=MoEConfig())


def expert_keys(config: ModelConfig) -> dict[str, Any]:
    """The config.json keys that describe the experts (added to the dense base family's keys)."""
    moe = config.moe
    expert_size = moe.intermediate_size or config.intermediate_size
    if config.family == "mixtral":
        return dict(num_local_experts=moe.num_experts, num_experts_per_tok=moe.num_experts_per_tok,
                    intermediate_size=expert_size, router_aux_loss_coef=moe.router_aux_loss_coef,
                    router_jitter_noise=0.0, output_router_logits=False, sliding_window=config.sliding_window)
    return dict(num_experts=moe.num_experts, num_experts_per_tok=moe.num_experts_per_tok,
                moe_intermediate_size=expert_size, norm_topk_prob=moe.normalize_topk,
                shared_expert_intermediate_size=moe.shared_expert_intermediate_size,
                router_aux_loss_coef=moe.router_aux_loss_coef, output_router_logits=False, decoder_sparse_step=1,
                mlp_only_layers=[], qkv_bias=True)


# Mixtral's tensor names: block_sparse_moe.{gate, experts.N.w1 (gate), w3 (up), w2 (down)}
_MIXTRAL_LEAF = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MIXTRAL_IN = re.compile(r"\.block_sparse_moe\.(gate\.|experts\.(\d+)\.(w1|w2|w3)\.)")
_MIXTRAL_OUT = re.compile(r"\.mlp\.(gate\.|experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.)")


def mixtral_to_lmstack(name: str) -> str:
    def rename(m: re.Match) -> str:
        return ".mlp.gate." if m.group(1) == "gate." else f".mlp.experts.{m.group(2)}.{_MIXTRAL_LEAF[m.group(3)]}."
    return _MIXTRAL_IN.sub(rename, name)


def mixtral_to_hf(name: str) -> str:
    back = {v: k for k, v in _MIXTRAL_LEAF.items()}

    def rename(m: re.Match) -> str:
        if m.group(1) == "gate.":
            return ".block_sparse_moe.gate."
        return f".block_sparse_moe.experts.{m.group(2)}.{back[m.group(3)]}."
    return _MIXTRAL_OUT.sub(rename, name)
