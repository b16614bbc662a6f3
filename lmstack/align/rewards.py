"""Reward functions for on-policy training (PPO, GRPO, RLOO): plain Python callables.

A reward function is `fn(prompt: str, completion: str, fields: dict) -> float`: the prompt text, the
sampled completion (special tokens removed) and the prompt record's other fields (e.g. "answer"). Name
one in a config by its key in REWARD_FUNCTIONS or as "package.module:function".

A sample whose reward function raises, or returns NaN / something that is not a number, is dropped from
the update and counted (`RewardStats`); the run goes on. One bad sample must not end a long run, and
silently scoring it 0 would teach the policy that whatever broke the function is merely bad.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmstack.errors import ConfigError

RewardFn = Callable[[str, str, dict[str, Any]], float]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalise_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5'; '-7' -> '-7'; None when `text` is not a number."""
    text = text.strip().replace(",", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return str(int(value)) if value == int(value) else repr(value)


def first_number(text: str) -> str | None:
    match = _NUMBER.search(text)
    return normalise_number(match.group()) if match else None


def gsm8k_final_answer(text: str) -> str | None:
    """The number after the last '####' (GSM8K's answer marker), normalised; None when there is none."""
    if "####" not in text:
        return None
    return first_number(text.rsplit("####", 1)[1])


def arithmetic_exact_match(prompt: str, completion: str, fields: dict[str, Any]) -> float:
    """1.0 when the completion's first number equals fields["answer"], else 0.0."""
    expected = normalise_number(str(fields["answer"]))
    return float(expected is not None and first_number(completion) == expected)


def gsm8k_answer(prompt: str, completion: str, fields: dict[str, Any]) -> float:
    """1.0 when the completion's '#### n' equals the reference answer's (fields["answer"], a GSM8K solution or
    a bare number), else 0.0."""
    reference = str(fields["answer"])
    expected = gsm8k_final_answer(reference) if "####" in reference else normalise_number(reference)
    return float(expected is not None and gsm8k_final_answer(completion) == expected)


def gsm8k_format(prompt: str, completion: str, fields: dict[str, Any]) -> float:
    """1.0 when the completion ends its reasoning with a '#### n' answer line, whatever the number."""
    return float(gsm8k_final_answer(completion) is not None)


REWARD_FUNCTIONS: dict[str, RewardFn] = {"arithmetic_exact_match": arithmetic_exact_match,
                                         "gsm8k_answer": gsm8k_answer, "gsm8k_format": gsm8k_format}


def resolve_reward_fn(name: str) -> RewardFn:
    """A registry name or "package.module:function" -> the callable; a ConfigError names what is missing."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if ":" not in name:
        raise ConfigError(f"unknown reward function {name!r}: use one of {', '.join(REWARD_FUNCTIONS)} or "
                          "'package.module:function'")
    module_name, attr = name.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward function {name!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"reward function {name!r} is not callable")
    return fn


@dataclass
class RewardStats:
    """Samples scored and dropped over a run (by cause), with the first error message of each cause."""

    scored: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    first_error: dict[str, str] = field(default_factory=dict)

    def drop(self, cause: str, message: str) -> None:
        self.dropped[cause] = self.dropped.get(cause, 0) + 1
        self.first_error.setdefault(cause, message)

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())


def score_samples(fns: Sequence[RewardFn], weights: Sequence[float] | None, prompts: Sequence[str],
                  completions: Sequence[str], fields: Sequence[dict[str, Any]], stats: RewardStats,
                  names: Sequence[str] | None = None) -> list[float]:
    """The weighted sum of the reward functions per sample; NaN for a dropped sample (counted in `stats`)."""
    weights = list(weights) if weights is not None else [1.0] * len(fns)
    names = list(names) if names is not None else [getattr(f, "__name__", repr(f)) for f in fns]
    rewards = []
    for prompt, completion, record in zip(prompts, completions, fields):
        total = 0.0
        for fn, weight, name in zip(fns, weights, names):
            try:
                value = fn(prompt, completion, record)
            except Exception as e:  # a user's function: any failure drops this sample, never the run
                stats.drop("raised", f"{name}: {type(e).__name__}: {e}")
                total = math.nan
                break
            if not isinstance(value, (int, float)) or not math.isfinite(value):  # a bool is 0 / 1, as Python has it
                stats.drop("not_finite", f"{name} returned {value!r}")
                total = math.nan
                break
            total += weight * float(value)
        if not math.isnan(total):
            stats.scored += 1
        rewards.append(total)
    return rewards


__all__ = ["REWARD_FUNCTIONS", "RewardFn", "RewardStats", "arithmetic_exact_match", "first_number", "gsm8k_answer",
           "gsm8k_final_answer", "gsm8k_format", "normalise_number", "resolve_reward_fn", "score_samples"]
