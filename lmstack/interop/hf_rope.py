"""Hugging Face `rope_scaling` / `rope_parameters` types beyond linear and llama3 <-> RopeScaling.

Read: dynamic, yarn, longrope (transformers' types). Written back under the same keys. lmstack's static
"ntk" kind has no transformers type; `lmstack.interop.families` writes it as plain RoPE with the
equivalent theta (the same frequencies, so transformers computes the same logits).
"""

from __future__ import annotations

from typing import Any

from lmstack.config import RopeScaling
from lmstack.errors import ConfigError

SUPPORTED = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")


def scaling_from_hf(kind: str, params: dict[str, Any], hf: dict[str, Any], source: str) -> RopeScaling:
    """The RopeScaling for rope type `kind` (dynamic, yarn, longrope) given its parameters and the whole config.json.

    As transformers fills them in: the trained context is `original_max_position_embeddings` (inside the
    parameters, or top-level as Phi-3 writes it, else max_position_embeddings); a missing LongRoPE / YaRN
    factor is max_position_embeddings / that context. For dynamic NTK transformers treats
    max_position_embeddings itself as the trained context.
    """
    max_positions = hf.get("max_position_embeddings")
    try:
        if kind == "dynamic":
            return RopeScaling(kind="dynamic", factor=float(params["factor"]),
                               original_max_position_embeddings=int(max_positions))
        if kind not in ("yarn", "longrope"):
            raise ConfigError(f"{source}: rope type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})")
        original = hf.get("original_max_position_embeddings") if kind == "longrope" else None
        original = int(original or params.get("original_max_position_embeddings") or max_positions)
        factor = params.get("factor")
        factor = float(factor) if factor is not None else max_positions / original
        common = dict(factor=factor, original_max_position_embeddings=original,
                      attention_factor=_optional_float(params.get("attention_factor")))
        if kind == "yarn":
            return RopeScaling(kind="yarn", beta_fast=float(params.get("beta_fast") or 32),
                               beta_slow=float(params.get("beta_slow") or 1),
                               mscale=_optional_float(params.get("mscale")),
                               mscale_all_dim=_optional_float(params.get("mscale_all_dim")),
                               truncate=bool(params.get("truncate", True)), **common)
        return RopeScaling(kind="longrope", short_factor=[float(x) for x in params["short_factor"]],
                           long_factor=[float(x) for x in params["long_factor"]], **common)
    except KeyError as e:
        raise ConfigError(f"{source}: rope type {kind!r} needs the key {e.args[0]!r}") from None
    except TypeError:
        raise ConfigError(f"{source}: rope type {kind!r} needs max_position_embeddings or "
                          "original_max_position_embeddings") from None


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def scaling_to_hf(scaling: RopeScaling) -> dict[str, Any]:
    """The keys beyond rope_type and factor that transformers reads for a dynamic / yarn / longrope scaling."""
    if scaling.kind == "yarn":
        extra = dict(original_max_position_embeddings=scaling.original_max_position_embeddings,
                     beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow, truncate=scaling.truncate)
        extra.update({k: getattr(scaling, k) for k in ("mscale", "mscale_all_dim", "attention_factor")
                      if getattr(scaling, k) is not None})
        return extra
    if scaling.kind == "longrope":
        extra = dict(original_max_position_embeddings=scaling.original_max_position_embeddings,
                     short_factor=list(scaling.short_factor), long_factor=list(scaling.long_factor))
        if scaling.attention_factor is not None:
            extra["attention_factor"] = scaling.attention_factor
        return extra
    return {}
