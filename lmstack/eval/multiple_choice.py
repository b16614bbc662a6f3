"""Multiple choice by log-likelihood, with lm-evaluation-harness's definitions.

Each choice is scored as log p(target_delimiter + choice | context). Encoding follows lm-eval's
`_encode_pair`: whitespace at the end of the context moves to the front of the continuation, the context is
encoded with the tokenizer's own special tokens (BOS where the tokenizer adds one), and the continuation is
what encoding context + continuation adds after the context's tokens. An empty context is the prefix token
(BOS, else EOS).

    acc       = [argmax_i ll_i == gold]
    acc_norm  = [argmax_i ll_i / len(choice_i in characters) == gold]   (the first of equal scores wins)

The context is run once per item and shared by its choices (lmstack.eval.loglikelihood).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from lmstack.errors import DataError, TokenizerError
from lmstack.eval.fewshot import ShotPicker, build_context
from lmstack.eval.loglikelihood import Item, Scorer
from lmstack.eval.report import TaskResult, mean_metric, per_subject
from lmstack.eval.tasks import MCTask
from lmstack.model.protocol import CausalLM


def prefix_token(tokenizer) -> int:
    """What an empty context is conditioned on: BOS, else EOS (lm-eval's prefix_token_id)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise TokenizerError("the tokenizer has neither a BOS nor an EOS token to condition an empty context on")
    return token


def encode_pairs(tokenizer, contexts: list[str], continuations: list[list[str]]) -> list[Item]:
    """lm-eval's `_encode_pair` for every (context, its continuations), in two batched tokenizer calls.

    Whitespace at the end of a context moves to the front of its continuations; the context is encoded with
    the tokenizer's special tokens; a continuation's ids are what encoding context + continuation adds after
    the context's ids. An empty context is [prefix token] and its continuations are encoded alone.
    """
    stripped = [c.rstrip() for c in contexts]
    moved = [c[len(s):] for c, s in zip(contexts, stripped)]
    context_ids = tokenizer.encode_batch(stripped, add_special_tokens=True)
    wholes = [s + m + c for s, m, conts in zip(stripped, moved, continuations) for c in conts]
    whole_ids = iter(tokenizer.encode_batch(wholes, add_special_tokens=True))
    items = []
    for s, m, ctx, conts in zip(stripped, moved, context_ids, continuations):
        rows = [next(whole_ids) for _ in conts]
        if not s:  # lm-eval: the prefix token, then the continuation encoded without special tokens
            items.append(Item([prefix_token(tokenizer)],
                              [tokenizer.encode(m + c, add_special_tokens=False) for c in conts]))
        else:
            items.append(Item(ctx, [whole[len(ctx):] for whole in rows]))
    return items


def argmax(values: list[float]) -> int:
    """Index of the largest value; the first of equal values (numpy's argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def build_items(task: MCTask, tokenizer, shots: int, limit: int | None = None,
                seed: int = 1234) -> tuple[list[Item], list[str], list[int]]:
    """Score requests for the first `limit` items: (Items, their context texts, the shots each got)."""
    contexts, continuations, used = [], [], []
    count = len(task.docs) if limit is None else min(limit, len(task.docs))
    picker = ShotPicker(task.docs, task.fewshot, task.fewshot_order, seed)
    for index in range(count):
        doc = task.docs[index]
        examples = picker.pick(index, shots)
        contexts.append(build_context(doc.query, [(e.query, e.choices[e.gold]) for e in examples],
                                      task.descriptions.get(doc.subject, ""), task.target_delimiter,
                                      task.fewshot_delimiter))
        continuations.append([task.target_delimiter + c for c in doc.choices])
        used.append(len(examples))
    items = encode_pairs(tokenizer, contexts, continuations)
    for doc, item, texts in zip(task.docs, items, continuations):
        empty = next((t for c, t in zip(item.continuations, texts) if not c), None)
        if empty is not None:
            raise DataError(f"{doc.where}: choice {empty!r} encodes to no tokens after the context")
    return items, contexts, used


def evaluate_multiple_choice(model: CausalLM, tokenizer, task: MCTask, shots: int | None = None,
                             limit: int | None = None, batch_size: int = 8, strict: bool = False,
                             max_length: int | None = None, seed: int = 1234,
                             progress: Callable[[int], None] | None = None) -> TaskResult:
    """Score every (or the first `limit`) item of `task`; acc and acc_norm with standard errors."""
    shots = task.default_shots if shots is None else shots
    items, contexts, used = build_items(task, tokenizer, shots, limit, seed)
    scorer = Scorer(model, batch_size=batch_size, max_length=max_length, strict=strict)
    started = time.perf_counter()
    scores = scorer.score(items, progress)
    seconds = time.perf_counter() - started

    acc, acc_norm, samples = [], [], []
    for doc, context, item_scores in zip(task.docs, contexts, scores):
        lls = [s.logprob for s in item_scores]
        pred = argmax(lls)
        pred_norm = argmax([ll / len(choice) for ll, choice in zip(lls, doc.choices)])
        acc.append(float(pred == doc.gold))
        acc_norm.append(float(pred_norm == doc.gold))
        samples.append({"where": doc.where, "subject": doc.subject, "context": context, "choices": doc.choices,
                        "gold": doc.gold, "loglikelihoods": lls, "is_greedy": [s.greedy for s in item_scores],
                        "pred": pred, "pred_norm": pred_norm, "acc": acc[-1], "acc_norm": acc_norm[-1]})
    subjects = [doc.subject if task.report_subjects else "" for doc in task.docs[:len(items)]]
    info = {"items": len(items), "shots": shots, "items_with_fewer_shots": sum(u < shots for u in used),
            "truncated": scorer.stats.truncated, "skipped": task.skipped, "forwards": scorer.stats.forwards,
            "tokens_run": scorer.stats.tokens_run, "seconds": round(seconds, 3),
            "items_per_s": round(len(items) / seconds, 2) if seconds > 0 else None}
    return TaskResult(task.name, [mean_metric("acc", acc), mean_metric("acc_norm", acc_norm)],
                      per_subject(subjects, {"acc": acc, "acc_norm": acc_norm}), samples, info)


__all__ = ["argmax", "build_items", "encode_pairs", "evaluate_multiple_choice",
           "prefix_token"]
