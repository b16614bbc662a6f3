"""A verifiable instruction task that ships as a generator: short problems with one exact answer.

Four kinds, phrased as instructions, each checkable by string equality:
    add       "What is 47 plus 8?"                                 -> "55"      (two digits plus one)
    sort      "Sort these numbers from smallest to largest: 7 2 9" -> "2 7 9"   (three digits)
    reverse   "Write the letters of 'plan' in reverse order."      -> "nalp"    (four letters)
    upper     "Write 'tabl' in capital letters."                   -> "TABL"    (four letters)

The sizes are fixed on purpose: a small model fine-tuned for a few CPU minutes learns them (every answer
character sits at a fixed distance from what it is computed from), where variable lengths, two-digit
addends and the `+` sign (absent from a character vocabulary trained on prose) left a 0.8M-parameter model
at ~2% after 6,400 samples. `add` has 900 distinct problems and `sort` 1,000, so a training set of a few
thousand records leaves unseen problems of every kind for evaluation.

`generate_tasks(n, seed)` is a pure function of its arguments; held-out sets exclude the prompts of a
training set (`exclude`), so exact match on them measures generalisation, not recall. Used by
`data.train: builtin:instruct-tasks` and benchmarks/finetune_quality.py; issue 14's reward functions can
use `exact_match`.

`pretraining_lines(n, seed)` is text for a base model's pretraining mixture, never an instruction's answer: the
task prompts alone, and generic drills a character model sees too rarely in a few minutes of prose to learn from
it: a word or digit string said twice (copying from the context), counting (number successors). A small model
pretrained on prose alone could not copy from its context, and fine-tuning did not teach it within 600 steps.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterable

KINDS = ("add", "sort", "reverse", "upper")
BUILTIN = "builtin:instruct-tasks"
SPACE = {"add": 90 * 10, "sort": 10**3, "reverse": 26**4, "upper": 26**4}  # distinct problems of each kind


def _problem(rng: random.Random, kind: str) -> tuple[str, str]:
    if kind == "add":
        a, b = rng.randint(10, 99), rng.randint(0, 9)
        return f"What is {a} plus {b}?", str(a + b)
    if kind == "sort":
        numbers = [rng.randint(0, 9) for _ in range(3)]
        return (f"Sort these numbers from smallest to largest: {' '.join(map(str, numbers))}",
                " ".join(map(str, sorted(numbers))))
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(4))
    if kind == "reverse":
        return f"Write the letters of '{word}' in reverse order.", word[::-1]
    return f"Write '{word}' in capital letters.", word.upper()


def generate_tasks(n: int, seed: int = 0, exclude: Iterable[str] = ()) -> list[dict[str, str]]:
    """n distinct problems as {"prompt", "completion"} records (kinds in turn: record i is KINDS[i % 4]), none of
    whose prompts is in `exclude`. ValueError when a kind has fewer unused problems than n asks of it."""
    rng = random.Random(seed)
    seen = set(exclude)
    records: list[dict[str, str]] = []
    misses = 0
    while len(records) < n:
        kind = KINDS[len(records) % len(KINDS)]
        prompt, answer = _problem(rng, kind)
        if prompt in seen:
            misses += 1
            if misses > 100 * SPACE[kind]:  # a kind's problems ran out: fail instead of looping forever
                raise ValueError(f"generate_tasks: only {SPACE[kind]:,} distinct {kind!r} problems exist; "
                                 f"{n:,} records (with {len(seen) - len(records):,} excluded) need more")
            continue
        misses = 0
        seen.add(prompt)
        records.append({"prompt": prompt, "completion": answer})
    return records


def pretraining_lines(n: int, seed: int = 0) -> list[str]:
    """n lines of pretraining text in turn: a task prompt (no answer), a word said twice, digits said twice,
    a count. A pure function of its arguments."""
    rng = random.Random(seed)
    lines: list[str] = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            lines.append(_problem(rng, KINDS[(i // 4) % len(KINDS)])[0])
        elif kind == 1:
            word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
            lines.append(f"'{word}', I said again: '{word}'.")
        elif kind == 2:
            digits = " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5)))
            lines.append(f"The numbers were {digits}; again, {digits}.")
        else:
            start = rng.randint(0, 95)
            lines.append("Counting: " + " ".join(str(k) for k in range(start, start + rng.randint(3, 6))) + ".")
    return lines


def exact_match(prediction: str, answer: str) -> bool:
    """The answer, ignoring surrounding whitespace."""
    return prediction.strip() == answer.strip()


__all__ = ["BUILTIN", "KINDS", "exact_match", "generate_tasks", "pretraining_lines"]
