"""config.json (Hugging Face, llama / mistral / qwen2 / gpt2) <-> ModelConfig.

Both the transformers v4 layout (`rope_theta` + `rope_scaling`) and v5 (`rope_parameters`) are read;
the v4 layout is written, which transformers 4 and 5 both read. Missing keys take the
defaults of the Hugging Face config class for that family, as transformers itself would; a key present
with the value null means None (no bos id, no sliding window), as it does to transformers.

One home per value: for a family transformers reads, the Hugging Face keys are the config, so a user who
edits `rope_theta` or `max_position_embeddings` gets that value in lmstack as in transformers. Only a
config no Hugging Face architecture expresses is written as lmstack's own block (model_type "lmstack").
"""

from __future__ import annotations

import warnings
from typing import Any

from lmstack.config import ModelConfig, RopeScaling
from lmstack.errors import ConfigError
from lmstack.schema import from_dict, to_dict

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}
# Defaults of transformers' config classes, for keys a config.json leaves out.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(rms_norm_eps=1e-6, max_position_embeddings=2048, tie_word_embeddings=False, rope_theta=10000.0,
                  bos_token_id=1, eos_token_id=2, sliding_window=None),
    "mistral": dict(rms_norm_eps=1e-6, max_position_embeddings=4096 * 32, tie_word_embeddings=False,
                    rope_theta=10000.0, bos_token_id=1, eos_token_id=2, sliding_window=4096),
    "qwen2": dict(rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False, rope_theta=10000.0,
                  bos_token_id=None, eos_token_id=None, sliding_window=None),
}
# Keys whose null in config.json means None, not "use the default" (transformers reads them that way).
_NULLABLE = {"bos_token_id", "eos_token_id", "pad_token_id", "sliding_window"}
# The Hugging Face key that holds each ModelConfig field (same name when not listed), to name it in messages.
_ARCH = dict(family="model_type", mlp_kind="model_type", norm_kind="model_type", norm_bias="model_type",
             position_kind="model_type")
_HF_KEYS: dict[str, dict[str, str]] = {
    "rope": dict(_ARCH, num_layers="num_hidden_layers", num_heads="num_attention_heads",
                 num_kv_heads="num_key_value_heads", norm_eps="rms_norm_eps", max_seq_len="max_position_embeddings",
                 dropout="attention_dropout", init_std="initializer_range", qkv_bias="attention_bias",
                 out_bias="attention_bias"),
    "gpt2": dict(_ARCH, hidden_size="n_embd", num_layers="n_layer", num_heads="n_head", intermediate_size="n_inner",
                 max_seq_len="n_positions", norm_eps="layer_norm_epsilon", dropout="resid_pdrop",
                 init_std="initializer_range", mlp_kind="activation_function", num_kv_heads="n_head",
                 head_dim="n_embd"),
}
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                     "gelu": "gelu", "relu": "relu"}


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face config.json dict; unsupported settings raise ConfigError naming `source` and key.

    For a family transformers reads, the Hugging Face keys are the config. An "lmstack" block beside them (the
    full copy lmstack wrote before it kept one home per value) is only compared: where it disagrees, the
    Hugging Face key wins, as it does in transformers, and a warning names both values.
    """
    model_type = hf.get("model_type")
    block = hf.get("lmstack")
    if model_type not in ARCHITECTURES and isinstance(block, dict):  # no HF architecture: the block is all there is
        try:
            return from_dict(ModelConfig, block)
        except ConfigError as e:
            raise ConfigError(f"{source}: lmstack.{e}") from None
    if model_type == "gpt2":
        config = _gpt2_from_hf(hf, source)
    elif model_type in _FAMILY_DEFAULTS:
        config = _rope_family_from_hf(hf, model_type, source)
    else:
        known = ", ".join(ARCHITECTURES)
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported (supported: {known})")
    if isinstance(block, dict):
        _warn_stale_block(config, block, source)
    return config


def _warn_stale_block(config: ModelConfig, block: dict[str, Any], source: str) -> None:
    ours = to_dict(config)
    keys = _HF_KEYS["gpt2" if config.family == "gpt2" else "rope"]
    stale = [f"{keys.get(name, name)} gives {name}={ours[name]!r} where lmstack.{name} says {value!r}"
             for name, value in block.items() if name in ours and ours[name] != value]
    if stale:
        warnings.warn(f"{source}: the \"lmstack\" block disagrees with the Hugging Face keys ({'; '.join(stale)}); "
                      "using the Hugging Face keys, as transformers does. Delete the \"lmstack\" block (an older "
                      "lmstack's copy of those keys) to silence this.", UserWarning, stacklevel=4)


def _rope_family_from_hf(hf: dict[str, Any], model_type: str, source: str) -> ModelConfig:
    defaults = _FAMILY_DEFAULTS[model_type]

    def get(key: str, default: Any = None) -> Any:
        if key in hf and (hf[key] is not None or key in _NULLABLE):
            return hf[key]
        return defaults.get(key, default)

    if get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported for {model_type} (only silu)")
    rope_theta, scaling = _rope_from_hf(hf, get("rope_theta"), source)
    attention_bias = bool(get("attention_bias", False))
    sliding_window = get("sliding_window")
    if model_type == "qwen2":
        sliding_window = _qwen2_window(hf, source)
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"], num_kv_heads=get("num_key_value_heads", hf["num_attention_heads"]),
            head_dim=hf.get("head_dim"), intermediate_size=hf["intermediate_size"], mlp_kind="swiglu",
            norm_kind="rmsnorm", norm_eps=float(get("rms_norm_eps")), position_kind="rope", rope_theta=rope_theta,
            rope_scaling=scaling, qkv_bias=attention_bias or model_type == "qwen2", out_bias=attention_bias,
            mlp_bias=bool(get("mlp_bias", False)), tie_word_embeddings=bool(get("tie_word_embeddings")),
            max_seq_len=int(get("max_position_embeddings")), sliding_window=sliding_window,
            dropout=float(get("attention_dropout", 0.0)), init_std=float(get("initializer_range", 0.02)),
            bos_token_id=get("bos_token_id"), eos_token_id=get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
            family=model_type,
        )
    except KeyError as e:
        raise ConfigError(f"{source}: required key {e.args[0]!r} is missing") from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _rope_from_hf(hf: dict[str, Any], default_theta: float, source: str) -> tuple[float, RopeScaling]:
    """theta and scaling as transformers 5 reads them (rope_scaling, else rope_parameters; their rope_theta, else
    the top-level one). Where the file says two things, transformers 4 (top-level rope_theta and rope_scaling)
    and 5 build different models from it, so a disagreement is an error naming both keys, not a guess."""
    places = {key: hf[key] for key in ("rope_scaling", "rope_parameters") if isinstance(hf.get(key), dict)}
    scalings = {key: _scaling_from_hf(params, f"{source}: {key}") for key, params in places.items()}
    if len(scalings) == 2 and scalings["rope_scaling"] != scalings["rope_parameters"]:
        raise ConfigError(f"{source}: rope_scaling is {hf['rope_scaling']} but rope_parameters is "
                          f"{hf['rope_parameters']}; transformers reads rope_scaling and ignores rope_parameters "
                          "when both are present: make them agree, or delete one")
    thetas = {f"{key}.rope_theta": params["rope_theta"] for key, params in places.items()
              if params.get("rope_theta") is not None}
    if hf.get("rope_theta") is not None:
        thetas["rope_theta"] = hf["rope_theta"]
    if len({float(v) for v in thetas.values()}) > 1:
        said = ", ".join(f"{key} is {value}" for key, value in thetas.items())
        raise ConfigError(f"{source}: {said}; transformers 4 reads rope_theta and transformers 5 the one inside "
                          "rope_scaling / rope_parameters, so they would build different models: set them all to "
                          "the value you want")
    theta = float(next(iter(thetas.values()), default_theta))
    return theta, next(iter(scalings.values()), RopeScaling())


def _scaling_from_hf(params: dict[str, Any], where: str) -> RopeScaling:
    kind = params.get("rope_type", params.get("type", "default"))
    try:
        if kind == "default":
            return RopeScaling()
        if kind == "linear":
            return RopeScaling(kind="linear", factor=float(params["factor"]))
        if kind == "llama3":
            return RopeScaling(kind="llama3", factor=float(params["factor"]),
                               low_freq_factor=float(params["low_freq_factor"]),
                               high_freq_factor=float(params["high_freq_factor"]),
                               original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    except KeyError as e:
        raise ConfigError(f"{where}: rope type {kind!r} needs the key {e.args[0]!r}") from None
    raise ConfigError(f"{where}: rope type {kind!r} is not supported (supported: default, linear, llama3)")


def _qwen2_window(hf: dict[str, Any], source: str) -> int | None:
    if not hf.get("use_sliding_window"):
        return None
    # transformers slides the window only in layers >= max_window_layers (or as layer_types says)
    first_sliding = hf.get("max_window_layers", 28)
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if i >= first_sliding else "full_attention" for i in range(hf["num_hidden_layers"])]
    if any(t != "sliding_attention" for t in layer_types):
        raise ConfigError(f"{source}: use_sliding_window with per-layer windows (layer_types) is not supported")
    return hf.get("sliding_window")


def _gpt2_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _GPT2_ACTIVATIONS:
        raise ConfigError(f"{source}: activation_function {activation!r} is not supported")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("add_cross_attention") or \
            hf.get("scale_attn_weights", True) is False:
        raise ConfigError(f"{source}: GPT-2 attention variants (scale_attn_by_inverse_layer_idx, "
                          "add_cross_attention, scale_attn_weights=false) are not supported")
    d = hf.get("n_embd", 768)
    try:
        return ModelConfig(
            vocab_size=hf.get("vocab_size", 50257), hidden_size=d, num_layers=hf.get("n_layer", 12),
            num_heads=hf.get("n_head", 12), intermediate_size=hf.get("n_inner") or 4 * d,
            mlp_kind=_GPT2_ACTIVATIONS[activation], norm_kind="layernorm", norm_bias=True,
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), position_kind="learned", qkv_bias=True,
            out_bias=True, mlp_bias=True, tie_word_embeddings=True, max_seq_len=hf.get("n_positions", 1024),
            dropout=float(hf.get("resid_pdrop", 0.1)), init_std=float(hf.get("initializer_range", 0.02)),
            bos_token_id=hf.get("bos_token_id", 50256), eos_token_id=hf.get("eos_token_id", 50256),
            pad_token_id=hf.get("pad_token_id"), family="gpt2",
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def hf_incompatibility(config: ModelConfig) -> str | None:
    """Why `config` cannot be written as its family's Hugging Face architecture, or None if it can."""
    family = config.family
    if family == "gpt2":
        wanted = dict(norm_kind="layernorm", norm_bias=True, position_kind="learned", qkv_bias=True, out_bias=True,
                      mlp_bias=True, tie_word_embeddings=True, sliding_window=None)
        if config.mlp_kind == "swiglu":
            return "gpt2 has no gated (swiglu) MLP"
        if config.num_kv_heads != config.num_heads or config.head_dim * config.num_heads != config.hidden_size:
            return "gpt2 needs num_kv_heads == num_heads and head_dim * num_heads == hidden_size"
    else:
        wanted = dict(mlp_kind="swiglu", norm_kind="rmsnorm", position_kind="rope")
        if family == "llama":
            wanted.update(sliding_window=None, out_bias=config.qkv_bias)
        elif family == "mistral":
            wanted.update(qkv_bias=False, out_bias=False, mlp_bias=False)
            wanted["rope_scaling"] = RopeScaling()
        elif family == "qwen2":
            wanted.update(qkv_bias=True, out_bias=False, mlp_bias=False)
    for key, value in wanted.items():
        if getattr(config, key) != value:
            return f"{family} needs {key}={value!r}, the config has {getattr(config, key)!r}"
    return None


def config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """ModelConfig -> a config.json dict that transformers loads as the family's architecture.

    A config the family cannot express gets model_type "lmstack" and is written whole under the "lmstack" key,
    so nobody mistakes it for a loadable HF model. Otherwise the Hugging Face keys alone hold it (config_from_hf
    reads every field back exactly), so there is no second copy to go stale when a user edits one.
    """
    family = config.family
    common = dict(vocab_size=config.vocab_size, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                  pad_token_id=config.pad_token_id, tie_word_embeddings=config.tie_word_embeddings,
                  initializer_range=config.init_std, torch_dtype=dtype, use_cache=True)
    if hf_incompatibility(config) is not None:
        return dict(model_type="lmstack", architectures=["Transformer"], lmstack=to_dict(config))
    if family == "gpt2":
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[config.mlp_kind]
        body = dict(n_embd=config.hidden_size, n_layer=config.num_layers, n_head=config.num_heads,
                    n_inner=config.intermediate_size, n_positions=config.max_seq_len, activation_function=act,
                    layer_norm_epsilon=config.norm_eps, resid_pdrop=config.dropout, embd_pdrop=config.dropout,
                    attn_pdrop=config.dropout, scale_attn_weights=True)
    else:
        body = dict(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                    num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                    num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, hidden_act="silu",
                    max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
                    rope_theta=config.rope_theta, attention_dropout=config.dropout)
        # The v4 layout, each value once: transformers 4 reads it, and 5 moves rope_theta into rope_parameters
        # itself. A second copy (v5's rope_parameters) would let an edit to one be ignored by one version.
        scaling = config.rope_scaling
        if scaling.kind == "linear":
            body["rope_scaling"] = dict(rope_type="linear", factor=scaling.factor)
        elif scaling.kind == "llama3":
            body["rope_scaling"] = dict(rope_type="llama3", factor=scaling.factor,
                                        low_freq_factor=scaling.low_freq_factor,
                                        high_freq_factor=scaling.high_freq_factor,
                                        original_max_position_embeddings=scaling.original_max_position_embeddings)
        if family == "llama":
            body.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
        elif family == "mistral":
            body.update(sliding_window=config.sliding_window)
        elif family == "qwen2":
            body.update(use_sliding_window=config.sliding_window is not None,
                        sliding_window=config.sliding_window, max_window_layers=0)
    return dict(architectures=[ARCHITECTURES[family]], model_type=family, **common, **body)
