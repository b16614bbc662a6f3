"""Evaluation results: one JSON file per run, a markdown table, the per-item samples, per-subject plots,
and the comparison of two runs.

    OUT/results.json   {"task", "model", "adapter", "settings", "metrics": [{metric, value, stderr, n}],
                        "subjects": {subject: {metric: value, "n": n}}, "info": {...}, "lmstack_version", "date"}
    OUT/results.md     the same as a table
    OUT/samples.jsonl  one line per item: its prompt, choices or generation, scores, correctness
    OUT/subjects.png   per-subject accuracy (tasks with subjects, e.g. MMLU)

Every file is written atomically.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmstack.atomic import atomic_file, write_text
from lmstack.errors import InputFileError
from lmstack.eval.metrics import mean, mean_stderr


@dataclass
class Metric:
    metric: str
    value: float
    stderr: float | None = None
    n: int = 0


@dataclass
class TaskResult:
    task: str
    metrics: list[Metric]
    subjects: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # counts, timings, signatures

    def value(self, metric: str) -> float:
        return next(m.value for m in self.metrics if m.metric == metric)


def mean_metric(name: str, values: list[float]) -> Metric:
    return Metric(name, mean(values), mean_stderr(values), len(values))


def per_subject(subjects: list[str], columns: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """subject -> {metric: mean, "n": count}; empty when there is at most one subject."""
    names = sorted(set(subjects))
    if len(names) < 2:
        return {}
    out = {}
    for name in names:
        rows = [i for i, s in enumerate(subjects) if s == name]
        out[name] = {metric: mean([values[i] for i in rows]) for metric, values in columns.items()}
        out[name]["n"] = len(rows)
    return out


# ------------------------------------------------------------------------------------------- files
def run_record(result: TaskResult, model: str, adapter: str | None, settings: dict[str, Any]) -> dict[str, Any]:
    from lmstack import __version__

    return {"task": result.task, "model": model, "adapter": adapter, "settings": settings,
            "metrics": [asdict(m) for m in result.metrics], "subjects": result.subjects, "info": result.info,
            "lmstack_version": __version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_run(out_dir: str | Path, record: dict[str, Any], samples: list[dict[str, Any]]) -> Path:
    """results.json, results.md, samples.jsonl (and subjects.png when there are subjects) under out_dir."""
    out = Path(out_dir)
    write_text(out / "results.json", json.dumps(_finite(record), indent=2, ensure_ascii=False) + "\n")
    write_text(out / "results.md", markdown(record))
    with atomic_file(out / "samples.jsonl") as f:
        for sample in samples:
            f.write(json.dumps(_finite(sample), ensure_ascii=False) + "\n")
    if record["subjects"]:
        plot_subjects(record, out / "subjects.png")
    return out / "results.json"


def _finite(value: Any) -> Any:
    """JSON has no NaN / inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def read_run(path: str | Path) -> dict[str, Any]:
    """A results.json, or a run directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputFileError(f"{path}: cannot read a results file ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise InputFileError(f"{path}:{e.lineno}: not a results.json ({e.msg})") from None
    if not isinstance(record, dict) or "metrics" not in record or "task" not in record:
        raise InputFileError(f"{path}: not an lmstack eval results.json (no task / metrics)")
    return record


# ------------------------------------------------------------------------------------------- tables
def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def markdown(record: dict[str, Any]) -> str:
    """The run as markdown: a header line, the metric table and, when present, the per-subject table."""
    adapter = f" + adapter {record['adapter']}" if record.get("adapter") else ""
    lines = [f"## {record['task']}: {record['model']}{adapter}", "",
             "| task | metric | value | stderr | n |", "| --- | --- | --- | --- | --- |"]
    for m in record["metrics"]:
        lines.append(f"| {record['task']} | {m['metric']} | {_fmt(m['value'])} | {_fmt(m['stderr'])} | {m['n']} |")
    settings = ", ".join(f"{k}={v}" for k, v in record.get("settings", {}).items() if v is not None)
    lines += ["", f"settings: {settings}"]
    for key in ("bleu_signature", "truncated", "skipped"):
        if record.get("info", {}).get(key):
            lines.append(f"{key}: {record['info'][key]}")
    if record.get("subjects"):
        names = [k for k in next(iter(record["subjects"].values())) if k != "n"]
        lines += ["", "| subject | " + " | ".join(names) + " | n |", "| --- |" + " --- |" * (len(names) + 1)]
        for subject, values in record["subjects"].items():
            lines.append(f"| {subject} | " + " | ".join(_fmt(values[k]) for k in names) + f" | {values['n']} |")
    return "\n".join(lines) + "\n"


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """A markdown table of A and B's shared metrics, the difference B - A, and whether it exceeds twice the
    combined standard error (an approximate 95% test of the difference of two independent means)."""
    lines = [f"A: {a['task']} {a['model']}{' + ' + a['adapter'] if a.get('adapter') else ''}",
             f"B: {b['task']} {b['model']}{' + ' + b['adapter'] if b.get('adapter') else ''}", "",
             "| task | metric | A | B | B - A | significant |", "| --- | --- | --- | --- | --- | --- |"]
    b_metrics = {m["metric"]: m for m in b["metrics"]}
    for m in a["metrics"]:
        other = b_metrics.get(m["metric"])
        if other is None or m["value"] is None or other["value"] is None:
            continue
        diff = other["value"] - m["value"]
        se = (m["stderr"] ** 2 + other["stderr"] ** 2) ** 0.5 if m["stderr"] and other["stderr"] else None
        significant = "-" if se is None else ("yes" if abs(diff) > 2 * se else "no")
        lines.append(f"| {a['task']} | {m['metric']} | {_fmt(m['value'])} | {_fmt(other['value'])} | "
                     f"{diff:+.4f} | {significant} |")
    if a["task"] != b["task"]:
        lines.append(f"\nnote: different tasks ({a['task']} vs {b['task']})")
    return "\n".join(lines) + "\n"


def plot_subjects(record: dict[str, Any], path: Path) -> None:
    """A horizontal bar per subject (its first metric, e.g. acc), with the overall value as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subjects = record["subjects"]
    metric = next(k for k in next(iter(subjects.values())) if k != "n")
    names = sorted(subjects, key=lambda s: subjects[s][metric])
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.22 * len(names) + 1)))
    ax.barh(names, [subjects[s][metric] for s in names], color="#4c72b0")
    overall = next((m["value"] for m in record["metrics"] if m["metric"] == metric), None)
    if overall is not None:
        ax.axvline(overall, color="#c44e52", linestyle="--", label=f"overall {overall:.3f}")
        ax.legend(loc="lower right")
    ax.set_xlabel(metric)
    ax.set_title(f"{record['task']}: {metric} per subject")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


__all__ = ["Metric", "TaskResult", "compare", "markdown", "mean_metric", "per_subject", "plot_subjects",
           "read_run", "run_record", "write_run"]
