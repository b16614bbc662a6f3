"""Synthetic tasks with a known answer or a known preference rule: small enough to train on a CPU in
minutes, exact enough to measure what alignment changed.

    arithmetic     "12+34=" -> "46": a verifiable task for GRPO / RLOO / PPO (reward: exact match)
    sorted letters "bfa:" -> four letters from a-h; the rule: an answer in alphabetical order is preferred.
                   SFT demonstrations are random (about 8% sorted by chance); DPO pairs put a sorted answer
                   against an unsorted one, so the policy's samples follow the rule more often afterwards.

Each generator is a pure function of its seed and returns JSON-ready records in the formats
lmstack.data.preference reads (prompt / completion, prompt / chosen / rejected, prompt / answer).
"""

from __future__ import annotations

import numpy as np

LETTERS = "abcdefgh"
ANSWER_LETTERS = 4


def arithmetic_problems(n: int, seed: int, max_operand: int = 49) -> list[dict[str, str]]:
    """n addition problems a+b= with 0 <= a, b <= max_operand: {"prompt": "a+b=", "answer": "a+b"}."""
    rng = np.random.default_rng([seed, 1])
    a, b = rng.integers(0, max_operand + 1, n), rng.integers(0, max_operand + 1, n)
    return [{"prompt": f"{x}+{y}=", "answer": str(x + y)} for x, y in zip(a.tolist(), b.tolist())]


def arithmetic_sft(n: int, seed: int, max_operand: int = 49) -> list[dict[str, str]]:
    """Demonstrations for the same task: {"prompt": "a+b=", "completion": "a+b"}."""
    return [{"prompt": r["prompt"], "completion": r["answer"]} for r in arithmetic_problems(n, seed, max_operand)]


def is_sorted_answer(completion: str) -> bool:
    """The rule: exactly four letters from a-h in alphabetical (non-decreasing) order."""
    text = completion.strip()
    return len(text) == ANSWER_LETTERS and all(c in LETTERS for c in text) and list(text) == sorted(text)


def _prompt(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(LETTERS), 3)) + ":"


def _answer(rng: np.random.Generator, sorted_: bool) -> str:
    while True:
        letters = "".join(rng.choice(list(LETTERS), ANSWER_LETTERS))
        ordered = "".join(sorted(letters))
        if sorted_:
            return ordered
        if letters != ordered:
            return letters


def sorted_letters_sft(n: int, seed: int) -> list[dict[str, str]]:
    """SFT demonstrations without the rule: a random prompt, four random letters."""
    rng = np.random.default_rng([seed, 2])
    return [{"prompt": _prompt(rng), "completion": "".join(rng.choice(list(LETTERS), ANSWER_LETTERS))}
            for _ in range(n)]


def sorted_letters_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """Preference pairs with the rule: chosen in alphabetical order, rejected not."""
    rng = np.random.default_rng([seed, 3])
    return [{"prompt": _prompt(rng), "chosen": _answer(rng, True), "rejected": _answer(rng, False)}
            for _ in range(n)]


def sorted_letters_prompts(n: int, seed: int) -> list[dict[str, str]]:
    """Prompts for measuring how often the policy's samples follow the rule."""
    rng = np.random.default_rng([seed, 4])
    return [{"prompt": _prompt(rng)} for _ in range(n)]


__all__ = ["arithmetic_problems", "arithmetic_sft", "is_sorted_answer", "sorted_letters_pairs",
           "sorted_letters_prompts", "sorted_letters_sft"]
