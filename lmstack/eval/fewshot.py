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


class ShotPicker:
    """Picks the k examples for each item of a task: from dev[subject] when there is a dev split for the item's
    subject, else from the other items of its subject (indexed once, so a 10k-item task picks in O(k))."""

    def __init__(self, docs: Sequence[Example], dev: dict[str, Sequence[Example]] | None = None,
                 order: str = "first_n", seed: int = 1234):
        self.docs, self.dev, self.order, self.seed = docs, dev, order, seed
        self.by_subject: dict[str, list[int]] = {}
        for i, doc in enumerate(docs):
            self.by_subject.setdefault(doc.subject, []).append(i)

    def pick(self, index: int, k: int) -> list:
        """The k examples for docs[index] (fewer when the pool is smaller); never the item itself."""
        if k <= 0:
            return []
        doc = self.docs[index]
        rng = random.Random(self.seed * 1_000_003 + index)
        if self.dev is not None and self.dev.get(doc.subject):
            pool = [d for d in self.dev[doc.subject] if d.query != doc.query]
            return list(pool[:k]) if self.order == "first_n" else rng.sample(pool, min(k, len(pool)))
        candidates = self.by_subject[doc.subject]
        chosen: list = []
        for i in rng.sample(candidates, min(len(candidates), k + 1 + min(len(candidates), 8))):
            if i != index and self.docs[i].query != doc.query and len(chosen) < k:
                chosen.append(self.docs[i])
        if len(chosen) < k:  # many items share this query text: look at all of them
            chosen = [self.docs[i] for i in candidates if i != index and self.docs[i].query != doc.query]
            chosen = rng.sample(chosen, min(k, len(chosen)))
        return chosen


def select_shots(index: int, docs: Sequence[Example], dev: dict[str, Sequence[Example]] | None, k: int,
                 order: str = "first_n", seed: int = 1234) -> list:
    """ShotPicker(docs, dev, order, seed).pick(index, k), for one item."""
    return ShotPicker(docs, dev, order, seed).pick(index, k)


def build_context(query: str, shots: Sequence[tuple[str, str]], description: str = "",
                  target_delimiter: str = " ", fewshot_delimiter: str = "\n\n") -> str:
    """The prompt text: description, then each (query, answer) example, then the item's query."""
    examples = "".join(q + target_delimiter + a + fewshot_delimiter for q, a in shots)
    return description + examples + query


__all__ = ["ShotPicker", "build_context", "select_shots"]
