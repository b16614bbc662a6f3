"""Generation tasks: the model writes an answer (greedy, through the public `lmstack.generate`), a metric
compares it with the references.

    gsm8k    GSM8K JSONL {question, answer}: lm-evaluation-harness's `gsm8k` task: 5-shot
             "Question: ...\\nAnswer: <worked solution> #### n" (chain-of-thought solutions from the data;
             few-shot from other items, never the item itself), stop at "Question:"; exact match of
             the strict (`#### n`) and the flexible (last number) extraction, with lm-eval's normalisation
    squad    SQuAD v1.1 / v2.0 JSON (data[].paragraphs[].qas[]): exact match and F1 with SQuAD's
             normalisation, max over the answers; an unanswerable v2 question's reference is ""
    YAML     any JSONL through a task file (kind: generate): exact_match, f1, bleu (sacrebleu, with its
             signature), rouge (rouge-score: rouge1, rouge2, rougeL, rougeLsum)

Prompts are encoded with the tokenizer's special tokens (BOS where it adds one), as lm-eval does. A prompt
that leaves no room for the answer keeps its last tokens (counted), or is an error with `strict`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from lmstack.errors import DataError
from lmstack.eval.fewshot import ShotPicker, build_context
from lmstack.eval.files import read_jsonl, read_text, require
from lmstack.eval.metrics import (
    INVALID,
    corpus_bleu,
    gsm8k_flexible,
    gsm8k_normalize,
    gsm8k_strict,
    rouge,
    squad_exact_match,
    squad_f1,
)
from lmstack.eval.report import Metric, TaskResult, mean_metric, per_subject
from lmstack.eval.tasks import GenDoc, GenTask


# ------------------------------------------------------------------------------------------- readers
def read_gsm8k(path: Path) -> GenTask:
    docs = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        answer = require(record, "answer", str, where)
        docs.append(GenDoc(f"Question: {require(record, 'question', str, where)}\nAnswer:", [answer], answer,
                           "", where))
    return GenTask("gsm8k", docs, ["exact_match_strict", "exact_match_flexible"], default_shots=5,
                   until=["Question:", "</s>", "<|im_end|>"], max_new_tokens=256, fewshot_order="random")


def read_squad(path: Path) -> GenTask:
    import json

    try:
        data = json.loads(read_text(path))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a SQuAD JSON file (a top-level 'data' list of articles): {e}") from None
    docs = []
    for a, article in enumerate(data):
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            for q, qa in enumerate(paragraph.get("qas", [])):
                where = f"{path}:data[{a}].paragraphs[{p}].qas[{q}]"
                question = require(qa, "question", str, where)
                answers = [x["text"] for x in qa.get("answers", []) if isinstance(x, dict) and "text" in x]
                references = answers or [""]  # v2.0 unanswerable: the right answer is none
                prompt = (f"Title: {article.get('title', '')}\n\nBackground: {paragraph.get('context', '')}\n\n"
                          f"Question: {question}\n\nAnswer:")
                docs.append(GenDoc(prompt, references, references[0], "", where))
    if not docs:
        raise DataError(f"{path}: no questions")
    return GenTask("squad", docs, ["exact_match", "f1"], until=["\n"], max_new_tokens=32)


GENERATION_READERS = {"gsm8k": read_gsm8k, "squad": read_squad}


# ------------------------------------------------------------------------------------------- running
def build_prompts(task: GenTask, shots: int, limit: int | None, seed: int = 1234) -> tuple[list[str], list[int]]:
    prompts, used = [], []
    count = len(task.docs) if limit is None else min(limit, len(task.docs))
    picker = ShotPicker(task.docs, task.fewshot, task.fewshot_order, seed)
    for index in range(count):
        doc = task.docs[index]
        examples = picker.pick(index, shots)
        prompts.append(build_context(doc.query, [(e.query, e.fewshot_target) for e in examples],
                                     task.descriptions.get(doc.subject, ""), task.target_delimiter,
                                     task.fewshot_delimiter))
        used.append(len(examples))
    return prompts, used


def generate_answers(model, tokenizer, prompts: list[str], until: list[str], max_new_tokens: int,
                     batch_size: int = 8, strict: bool = False, temperature: float = 0.0, seed: int | None = None,
                     progress: Callable[[int], None] | None = None) -> tuple[list[str], int]:
    """Greedy (or sampled) completions of `prompts`, cut at the first `until` string; and how many prompts were
    truncated from the left to leave room for max_new_tokens. Batched longest first."""
    from lmstack.generate import generate  # the public API; imported here to keep `lmstack.eval` import light

    context = model.config.max_seq_len
    max_new_tokens = min(max_new_tokens, context - 1)
    encoded = tokenizer.encode_batch(prompts, add_special_tokens=True)
    too_long = [i for i, ids in enumerate(encoded) if len(ids) + max_new_tokens > context]
    if too_long and strict:
        i = too_long[0]
        raise DataError(f"prompt {i} has {len(encoded[i])} tokens; with {max_new_tokens} new tokens it exceeds the "
                        f"model's context ({context}); without --strict it keeps its last tokens")
    cut = set(too_long)
    encoded = [ids[-(context - max_new_tokens):] if i in cut else ids for i, ids in enumerate(encoded)]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    texts: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        out = generate(model, tokenizer, [encoded[i] for i in rows], max_new_tokens=max_new_tokens,
                       stop=list(until), temperature=temperature, seed=seed)
        for i, text in zip(rows, out.texts):
            texts[i] = text
        if progress is not None:
            progress(len(rows))
    return texts, len(too_long)


def evaluate_generation(model, tokenizer, task: GenTask, shots: int | None = None, limit: int | None = None,
                        batch_size: int = 8, strict: bool = False, max_new_tokens: int | None = None,
                        seed: int = 1234, progress: Callable[[int], None] | None = None) -> TaskResult:
    shots = task.default_shots if shots is None else shots
    prompts, used = build_prompts(task, shots, limit, seed)
    started = time.perf_counter()
    outputs, truncated = generate_answers(model, tokenizer, prompts, task.until, max_new_tokens or task.max_new_tokens,
                                          batch_size, strict, progress=progress)
    seconds = time.perf_counter() - started
    docs = task.docs[:len(prompts)]
    references = [d.references for d in docs]
    columns = score_outputs(task.metrics, outputs, references)
    info = {"items": len(docs), "shots": shots, "items_with_fewer_shots": sum(u < shots for u in used),
            "truncated": truncated, "skipped": task.skipped, "seconds": round(seconds, 3)}
    metrics = [mean_metric(name, values) for name, values in columns.items() if name != "bleu"]
    if "bleu" in task.metrics:
        score, signature = corpus_bleu(outputs, references)
        metrics.insert(0, Metric("bleu", score, None, len(outputs)))
        info["bleu_signature"] = signature
    samples = []
    for i, (doc, prompt, output) in enumerate(zip(docs, prompts, outputs)):
        sample = {"where": doc.where, "prompt": prompt, "output": output, "references": doc.references}
        sample.update({name: values[i] for name, values in columns.items()})
        if task.name == "gsm8k":
            sample.update(strict=gsm8k_strict(output), flexible=gsm8k_flexible(output))
        samples.append(sample)
    subjects = per_subject([d.subject for d in docs], columns)
    return TaskResult(task.name, metrics, subjects, samples, info)


def score_outputs(metrics: list[str], outputs: list[str], references: list[list[str]]) -> dict[str, list[float]]:
    """Per-item values of each metric (BLEU is corpus-level: computed by the caller)."""
    columns: dict[str, list[float]] = {}
    for name in metrics:
        if name == "exact_match":
            columns[name] = [squad_exact_match(o, r) for o, r in zip(outputs, references)]
        elif name == "f1":
            columns[name] = [squad_f1(o, r) for o, r in zip(outputs, references)]
        elif name == "rouge":
            columns.update(rouge(outputs, references))
        elif name in ("exact_match_strict", "exact_match_flexible"):
            extract = gsm8k_strict if name.endswith("strict") else gsm8k_flexible
            columns[name] = [float(any(extract(o) != INVALID and gsm8k_normalize(extract(o)) == gsm8k_normalize(ref)
                                       for ref in refs)) for o, refs in zip(outputs, references)]
        elif name == "bleu":
            continue
        else:
            raise DataError(f"unknown generation metric {name!r}")
    return columns


__all__ = ["GENERATION_READERS", "build_prompts", "evaluate_generation", "generate_answers", "read_gsm8k",
           "read_squad", "score_outputs"]
