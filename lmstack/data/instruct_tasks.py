"""A verifiable instruction task that ships as a generator: short problems with one exact answer.

Four kinds, phrased as instructions, each checkable by string equality:
    add       "What is 47 + 38?"                                    -> "85"
    sort      "Sort these numbers from smallest to largest: 7 2 9"  -> "2 7 9"   (3-5 digits)
    reverse   "Write the letters of 'plan' in reverse order."       -> "nalp"    (3-5 letters)
    upper     "Write 'table' in capital letters."                   -> "TABLE"

`generate_tasks(n, seed)` is a pure function of its arguments; held-out sets exclude the prompts of a
training set (`exclude`), so exact match on them measures generalisation, not recall. Used by
`data.train: builtin:instruct-tasks` and benchmarks/finetune_quality.py; issue 14's reward functions can
use `exact_match`.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterable

KINDS = ("add", "sort", "reverse", "upper")
BUILTIN = "builtin:instruct-tasks"


def _problem(rng: random.Random, kind: str) -> tuple[str, str]:
    if kind == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"What is {a} + {b}?", str(a + b)
    if kind == "sort":
        numbers = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
        return (f"Sort these numbers from smallest to largest: {' '.join(map(str, numbers))}",
                " ".join(map(str, sorted(numbers))))
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5 if kind == "reverse" else 6)))
    if kind == "reverse":
        return f"Write the letters of '{word}' in reverse order.", word[::-1]
    return f"Write '{word}' in capital letters.", word.upper()


def generate_tasks(n: int, seed: int = 0, exclude: Iterable[str] = ()) -> list[dict[str, str]]:
    """n distinct problems as {"prompt", "completion"} records (kinds in turn), none of whose prompts is in `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude)
    records: list[dict[str, str]] = []
    while len(records) < n:
        prompt, answer = _problem(rng, KINDS[len(records) % len(KINDS)])
        if prompt in seen:
            continue
        seen.add(prompt)
        records.append({"prompt": prompt, "completion": answer})
    return records


def exact_match(prediction: str, answer: str) -> bool:
    """The answer, ignoring surrounding whitespace."""
    return prediction.strip() == answer.strip()


__all__ = ["BUILTIN", "KINDS", "exact_match", "generate_tasks"]
