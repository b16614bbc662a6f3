"""An AI judge: preference labels for RLAIF and win rates, asked in both orders.

A judge is anything that answers a list of judge prompts with a list of texts: an lmstack model
(`ModelJudge`), a model behind an OpenAI-compatible URL (`OpenAIJudge`: POST {url}/chat/completions), or
any Python callable (`CallableJudge`). Each comparison is asked twice, with the two responses in both
orders; the verdict is read from the first letter of the answer ("A" / "B").

    both orders pick the same response   a win for it
    the orders disagree                  a tie (the judge only followed the position)
    an answer that is not A or B         off-format: counted, and the comparison is left out

`label_pairs` turns agreed comparisons into prompt / chosen / rejected records (what `lmstack align dpo`
trains on); ties and off-format answers are not labels. `win_rate` scores policy answers against reference
answers: (wins + ties / 2) / comparisons, plus a length-controlled rate: the win probability at zero length
difference from a logistic regression of the outcome on the (standardised) length difference, the idea of
AlpacaEval 2's length control (a judge that prefers longer answers cannot be gamed by length).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from lmstack.errors import GenerationError
from lmstack.generate import generate

JUDGE_TEMPLATE = ("Which response answers the request better? Reply with one letter: A or B.\n\n"
                  "Request:\n{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\nThe better response is")
_VERDICT = re.compile(r"^\W*(?:(?i:response|answer)\s*)?\(?([AB])\b")  # capital letters only: "a" is an article
Outcome = Literal["first", "second", "tie", "off_format"]


class Judge(Protocol):
    def __call__(self, prompts: Sequence[str]) -> list[str]:
        """Judge prompts -> the judge's raw answers, one each."""
        ...


class CallableJudge:
    """A judge from a function of one judge prompt to one answer."""

    def __init__(self, fn: Callable[[str], str]):
        self.fn = fn

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        return [self.fn(p) for p in prompts]


class ModelJudge:
    """An lmstack model as the judge: greedy answers, the prompt through its chat template when it has one."""

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int = 4, batch_size: int = 16):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def _ids(self, prompt: str) -> list[int]:
        if self.tokenizer.chat_template is not None:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                        add_generation_prompt=True)
        return self.tokenizer.encode(prompt)

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        answers: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            ids = [self._ids(p) for p in prompts[start:start + self.batch_size]]
            out = generate(self.model, self.tokenizer, ids, max_new_tokens=self.max_new_tokens, temperature=0.0,
                           truncate_prompt=True)
            answers += [self.tokenizer.decode(t, skip_special_tokens=True) for t in out.token_ids]
        return answers


class OpenAIJudge:
    """A model behind an OpenAI-compatible chat-completions endpoint (`url` ends in /v1), answering greedily."""

    def __init__(self, url: str, model: str = "judge", api_key: str | None = None, max_tokens: int = 4,
                 timeout: float = 60.0):
        self.url, self.model, self.api_key = url.rstrip("/"), model, api_key
        self.max_tokens, self.timeout = max_tokens, timeout

    def _ask(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": self.max_tokens, "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.url}/chat/completions", data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise GenerationError(f"judge {self.url}/chat/completions: {getattr(e, 'reason', e)}") from None
        except json.JSONDecodeError:
            raise GenerationError(f"judge {self.url}/chat/completions: the reply is not JSON") from None
        try:
            return str(reply["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise GenerationError(f"judge {self.url}: no choices[0].message.content in the reply") from None

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        return [self._ask(p) for p in prompts]


def parse_verdict(answer: str) -> Literal["A", "B"] | None:
    """'A', ' B.', '(A)', 'Response B is better' -> the letter; anything else -> None (off-format)."""
    match = _VERDICT.match(answer)
    return match.group(1).upper() if match else None  # type: ignore[return-value]


@dataclass
class Comparison:
    """One comparison of two responses, asked in both orders."""

    prompt: str
    first: str
    second: str
    answers: tuple[str, str] = ("", "")
    outcome: Outcome = "off_format"


@dataclass
class JudgeCounts:
    first: int = 0
    second: int = 0
    tie: int = 0
    off_format: int = 0
    examples: dict[str, str] = field(default_factory=dict)  # one raw off-format answer, for the message

    @property
    def judged(self) -> int:
        return self.first + self.second + self.tie

    def to_dict(self) -> dict[str, Any]:
        return {"first": self.first, "second": self.second, "tie": self.tie, "off_format": self.off_format,
                **({"off_format_example": self.examples["off_format"]} if "off_format" in self.examples else {})}


def compare(judge: Judge, items: Sequence[tuple[str, str, str]], template: str = JUDGE_TEMPLATE
            ) -> tuple[list[Comparison], JudgeCounts]:
    """Judge (prompt, first, second) triples in both orders -> comparisons with their outcomes, and counts."""
    asked = [template.format(prompt=p, a=a, b=b) for p, a, b in items]
    swapped = [template.format(prompt=p, a=b, b=a) for p, a, b in items]
    answers = judge(asked + swapped)
    if len(answers) != 2 * len(items):
        raise GenerationError(f"the judge returned {len(answers)} answers for {2 * len(items)} prompts")
    comparisons, counts = [], JudgeCounts()
    for i, (p, a, b) in enumerate(items):
        straight, crossed = parse_verdict(answers[i]), parse_verdict(answers[len(items) + i])
        if straight is None or crossed is None:
            outcome: Outcome = "off_format"
            counts.examples.setdefault("off_format", answers[i] if straight is None else answers[len(items) + i])
        elif straight == "A" and crossed == "B":
            outcome = "first"
        elif straight == "B" and crossed == "A":
            outcome = "second"
        else:
            outcome = "tie"
        setattr(counts, outcome, getattr(counts, outcome) + 1)
        comparisons.append(Comparison(p, a, b, (answers[i], answers[len(items) + i]), outcome))
    return comparisons, counts


def label_pairs(judge: Judge, items: Sequence[tuple[str, str, str]], template: str = JUDGE_TEMPLATE
                ) -> tuple[list[dict[str, str]], JudgeCounts]:
    """RLAIF: (prompt, response 1, response 2) -> prompt / chosen / rejected records for the comparisons where
    both orders agree; ties and off-format answers give no record (see the counts)."""
    comparisons, counts = compare(judge, items, template)
    records = []
    for c in comparisons:
        if c.outcome == "first":
            records.append({"prompt": c.prompt, "chosen": c.first, "rejected": c.second})
        elif c.outcome == "second":
            records.append({"prompt": c.prompt, "chosen": c.second, "rejected": c.first})
    return records, counts


def _logistic_intercept(outcomes: np.ndarray, x: np.ndarray, ridge: float = 1e-3, iterations: int = 50) -> float:
    """Fit P(win) = σ(b0 + b1·x) to outcomes in [0, 1] (ties 0.5) by Newton's method; returns σ(b0)."""
    X = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-X @ w))
        gradient = X.T @ (p - outcomes) + ridge * w
        hessian = X.T @ (X * (p * (1 - p))[:, None]) + ridge * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + np.exp(-w[0])))


def win_rate(judge: Judge, prompts: Sequence[str], policy: Sequence[str], reference: Sequence[str],
             template: str = JUDGE_TEMPLATE, length: Callable[[str], int] = len) -> dict[str, Any]:
    """Policy answers against reference answers on the same prompts: the win rate (ties half), the
    length-controlled win rate, and the counts (off-format comparisons are left out and counted)."""
    comparisons, counts = compare(judge, list(zip(prompts, policy, reference)), template)
    judged = [c for c in comparisons if c.outcome != "off_format"]
    n = len(judged)
    result: dict[str, Any] = {"comparisons": n, "wins": counts.first, "losses": counts.second, "ties": counts.tie,
                              "off_format": counts.off_format, "win_rate": None, "lc_win_rate": None}
    if n == 0:
        return result
    outcomes = np.array([{"first": 1.0, "second": 0.0, "tie": 0.5}[c.outcome] for c in judged])
    result["win_rate"] = float(outcomes.mean())
    diff = np.array([length(c.first) - length(c.second) for c in judged], dtype=np.float64)
    scale = diff.std()
    result["lc_win_rate"] = _logistic_intercept(outcomes, diff / scale if scale > 0 else diff * 0)
    result["mean_length_difference"] = float(diff.mean())
    if counts.off_format:
        result["off_format_example"] = counts.examples.get("off_format")
    return result


__all__ = ["JUDGE_TEMPLATE", "CallableJudge", "Comparison", "Judge", "JudgeCounts", "ModelJudge", "OpenAIJudge",
           "compare", "label_pairs", "parse_verdict", "win_rate"]
