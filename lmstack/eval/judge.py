"""LLM-as-judge: pairwise comparison of two models' answers by a judge model, in both orders.

For each question the judge sees the two answers as "Assistant A" and "Assistant B" (an MT-bench-style
pairwise prompt) and its verdict is the most likely of the continuations " A", " B" and " C" (tie) after
"Verdict:" (log-likelihoods through the scorer: deterministic, and usable with a small judge that would
not follow a format when generating). The question is judged twice with the answers swapped; model A wins
only when both orders prefer it, loses only when both prefer B, and anything else is a tie, which removes
the judge's position bias from the result.

    win_rate = (wins + ties / 2) / questions          (model A against model B)
    consistency = fraction of questions whose two verdicts agree
"""

from __future__ import annotations

from collections.abc import Callable

from lmstack.eval.loglikelihood import Scorer
from lmstack.eval.metrics import mean
from lmstack.eval.multiple_choice import encode_pairs
from lmstack.eval.report import Metric, TaskResult, mean_metric

JUDGE_TEMPLATE = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
    "to the user question displayed below. Choose the assistant that follows the user's instructions and answers "
    "the user's question better. Do not let the order of the responses, their length or the assistants' names "
    "influence you. Answer \"A\" if assistant A is better, \"B\" if assistant B is better, and \"C\" for a tie.\n\n"
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{first}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{second}\n[The End of Assistant B's Answer]\n\n"
    "Verdict:"
)
VERDICTS = [" A", " B", " C"]


def verdicts(judge, tokenizer, questions: list[str], first: list[str], second: list[str], batch_size: int = 8,
             template: str = JUDGE_TEMPLATE, progress: Callable[[int], None] | None = None) -> list[str]:
    """"A", "B" or "C" (tie) per question: the judge's most likely verdict with `first` shown as A."""
    contexts = [template.format(question=q, first=a, second=b) for q, a, b in zip(questions, first, second)]
    items = encode_pairs(tokenizer, contexts, [VERDICTS] * len(contexts))
    scores = Scorer(judge, batch_size=batch_size).score(items, progress)
    return ["ABC"[max(range(3), key=lambda i: s[i].logprob)] for s in scores]


def pairwise(judge, tokenizer, questions: list[str], answers_a: list[str], answers_b: list[str],
             batch_size: int = 8, template: str = JUDGE_TEMPLATE,
             progress: Callable[[int], None] | None = None) -> TaskResult:
    """Model A's win rate against model B, judged in both orders."""
    forward = verdicts(judge, tokenizer, questions, answers_a, answers_b, batch_size, template, progress)
    swapped = verdicts(judge, tokenizer, questions, answers_b, answers_a, batch_size, template, progress)
    swapped = [{"A": "B", "B": "A"}.get(v, v) for v in swapped]  # back to "A means model A"
    outcome, samples = [], []
    for q, a, b, v1, v2 in zip(questions, answers_a, answers_b, forward, swapped):
        result = "win" if v1 == v2 == "A" else "loss" if v1 == v2 == "B" else "tie"
        outcome.append({"win": 1.0, "tie": 0.5, "loss": 0.0}[result])
        samples.append({"question": q, "answer_a": a, "answer_b": b, "verdict_a_first": v1,
                        "verdict_b_first": v2, "result": result})
    n = len(outcome)
    counts = {r: sum(s["result"] == r for s in samples) for r in ("win", "tie", "loss")}
    consistency = [float(s["verdict_a_first"] == s["verdict_b_first"]) for s in samples]
    metrics = [mean_metric("win_rate", outcome), Metric("consistency", mean(consistency), None, n)]
    return TaskResult("judge", metrics, {}, samples, {"questions": n, **counts})


__all__ = ["JUDGE_TEMPLATE", "VERDICTS", "pairwise", "verdicts"]
