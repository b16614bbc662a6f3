"""`LoraConfig`: what a LoRA / DoRA adapter is, with peft's field names and meanings.

The fields are peft's (`peft.LoraConfig`), so an `adapter_config.json` maps onto this dataclass key
for key and a YAML `lora:` section reads like a peft config. Module names in `target_modules`,
`modules_to_save`, `rank_pattern` and `alpha_pattern` may be Hugging Face's (what peft sees, e.g.
GPT-2's `c_attn`) or lmstack's (`q_proj`); for Llama-family models the two are the same.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from lmstack.errors import ConfigError


@dataclass
class LoraConfig:
    """y = W x + s * B(A(dropout(x))), s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)); A kaiming-uniform, B zero.

    target_modules: a list (a module matches when its name equals an entry or ends with "." + entry),
      one string (a regular expression the whole module name must match), or "all-linear" (every linear
      layer but the output head), as in peft.
    use_dora: DoRA (Liu et al. 2024): W' = m / ||W + sBA|| * (W + sBA), a trained magnitude m per output row.
    modules_to_save: modules trained in full beside the adapter and stored in it (e.g. ["lm_head"]).
    trainable_token_indices: rows of the embedding (and of the head) trained and stored on their own:
      peft's memory-light way to learn new tokens (chat markers a base model lacks).
    rank_pattern / alpha_pattern: per-module r / lora_alpha, keyed like peft (a name suffix or a regex).
    """

    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    exclude_modules: list[str] = field(default_factory=list)
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    trainable_token_indices: list[int] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"lora.r must be positive, got {self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("lora.target_modules is empty; name modules (e.g. [q_proj, v_proj]) or use all-linear")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ConfigError(f"lora.target_modules: {self.target_modules!r} is not a valid regex ({e})") from None
        for name, value in self.rank_pattern.items():
            if int(value) <= 0:
                raise ConfigError(f"lora.rank_pattern[{name!r}] must be positive, got {value}")

    def matches(self, names: list[str]) -> bool:
        """Whether a module known by any of `names` (its lmstack and Hugging Face names) is a target (peft's rule)."""
        if any(_listed(n, self.exclude_modules) for n in names):
            return False
        if any(_listed(n, self.modules_to_save) or _inside(n, self.modules_to_save) for n in names):
            return False  # a module trained in full never also gets an adapter (peft's rule too)
        if self.target_modules == "all-linear":
            return True  # the caller offers only linear layers that are not the head
        if isinstance(self.target_modules, str):
            return any(re.fullmatch(self.target_modules, n) for n in names)
        return any(_listed(n, self.target_modules) for n in names)

    def rank_and_alpha(self, names: list[str]) -> tuple[int, float]:
        """This module's (r, lora_alpha): a rank_pattern / alpha_pattern entry matching one of its names, else the defaults."""
        return (int(_pattern_value(self.rank_pattern, names, self.r)),
                float(_pattern_value(self.alpha_pattern, names, self.lora_alpha)))

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _listed(name: str, entries: list[str]) -> bool:
    return name in entries or any(name.endswith("." + e) for e in entries)


def _inside(name: str, modules: list[str]) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}\.", name) for m in modules)


def _pattern_value(pattern: dict, names: list[str], default: float) -> float:
    for key, value in pattern.items():  # peft's get_pattern_key: the key matches a dotted suffix of the name
        if any(re.match(rf"(.*\.)?({key})$", n) for n in names):
            return value
    return default


__all__ = ["LoraConfig"]
