"""Few-shot prompts laid out as lm-evaluation-harness lays them out (plain text, no chat template):

    description + (query_1 + target_delimiter + answer_1 + fewshot_delimiter) ... + query

Examples come from the task's dev split when it has one (its first k, as lm-eval's first_n sampler takes
MMLU's dev items), otherwise from other items of the same subject, drawn with a seed fixed per item, so an
item's prompt does not depend on --limit or on the order items are run in. Never the item itself.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol


class Example(Protocol):
    query: str
    subject: str


def select_shots(index: int, docs: Sequence[Example], dev: dict[str, Sequence[Example]] | None, k: int,
                 order: str = "first_n", seed: int = 1234) -> list:
    """The k examples for docs[index]: from dev[subject] when there is a dev split for its subject, else from
    the other items of its subject. Fewer than k when the pool is smaller."""
    if k <= 0:
        return []
    doc = docs[index]
    if dev is not None and dev.get(doc.subject):
        pool = [d for d in dev[doc.subject] if d.query != doc.query]
        if order == "first_n":
            return list(pool[:k])
    else:
        pool = [d for i, d in enumerate(docs) if d.subject == doc.subject and i != index and d.query != doc.query]
    rng = random.Random(seed * 1_000_003 + index)
    return rng.sample(pool, min(k, len(pool)))


def build_context(query: str, shots: Sequence[tuple[str, str]], description: str = "",
                  target_delimiter: str = " ", fewshot_delimiter: str = "\n\n") -> str:
    """The prompt text: description, then each (query, answer) example, then the item's query."""
    examples = "".join(q + target_delimiter + a + fewshot_delimiter for q, a in shots)
    return description + examples + query


__all__ = ["build_context", "select_shots"]
