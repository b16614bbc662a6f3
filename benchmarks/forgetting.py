"""Catastrophic forgetting, measured and mitigated: the task learned vs the pretraining perplexity lost.

On the base of benchmarks/adapt_runs.py (a character model pretrained here on tinyshakespeare + Emma), each
variant fine-tunes on `builtin:instruct-tasks` for the same steps: full fine-tuning, LoRA, full + replay
(a quarter of each micro-batch's rows from the pretraining shards), full + EWC (Fisher on 64 pretraining
windows) and full + L2-SP. Reported per variant: the task (exact match on held-out problems, held-out
assistant-token loss) and the increase of the pretraining validation perplexity. One JSON line per variant, also
appended to --results (docs/forgetting.jsonl), from which --plot (docs/forgetting.svg) draws forgetting (log scale)
against the task for every variant measured so far (the latest line of each).

    python benchmarks/forgetting.py                               # 5 variants, 100 steps each (short)
    python benchmarks/forgetting.py --steps 600 --ewc-lambda 5000
    python benchmarks/forgetting.py --variants full+l2sp full+ewc --ewc-lambda 1e4 1e5   # one row per lambda / alpha
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adapt_runs import ROOT, base_model, finetune_run
from svg_plot import Point, scatter

VARIANTS = ["full", "lora", "full+replay", "full+ewc", "full+l2sp", "lora+replay"]
LR = {"full": 2e-3, "lora": 5e-3}


def overrides(variant: str, data: Path, work: Path, args, knob: float | None) -> list[str]:
    extra = []
    if "replay" in variant:
        extra += [f"--forgetting.replay_data={data}", f"--forgetting.replay_fraction={args.replay_fraction}"]
    if "ewc" in variant:
        extra += [f"--forgetting.ewc_lambda={knob}", f"--forgetting.ewc_fisher={work / 'fisher.safetensors'}",
                  f"--forgetting.ewc_data={data}", "--forgetting.ewc_windows=64"]
    if "l2sp" in variant:
        extra += [f"--forgetting.l2sp_alpha={knob}"]
    return extra


def label(line: dict) -> str:
    """The variant and its knob, as the plot names it."""
    name = {"full": "full", "lora": "LoRA r=16"}.get(line["method"].split("+")[0], line["method"])
    if "ewc_lambda" in line:
        return f"{name} + EWC \u03bb={line['ewc_lambda']:g}"
    if "l2sp_alpha" in line:
        return f"{name} + L2-SP \u03b1={line['l2sp_alpha']:g}"
    if "replay_fraction" in line:
        return f"{name} + replay {line['replay_fraction']:.0%}"
    return name


def plot(results: Path, svg: Path) -> None:
    """Forgetting against the task, one point per variant (the latest line of each in `results`)."""
    latest = {}
    for line in results.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            latest[label(record)] = record
    points = [Point(r["task_val_loss"], r["pretrain_ppl_increase"], name) for name, r in latest.items()]
    scatter(sorted(points, key=lambda p: p.x), svg, log_y=True,
            title="Forgetting vs task: 100 full/LoRA fine-tuning steps on the 0.8M char model",
            xlabel="held-out answer loss (task; lower is better)",
            ylabel="pretraining val ppl increase (log; lower is better)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "adapt")
    parser.add_argument("--variants", nargs="+", default=VARIANTS[:5], choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--replay-fraction", type=float, default=0.25)
    parser.add_argument("--ewc-lambda", type=float, nargs="+", default=[1000.0])
    parser.add_argument("--l2sp-alpha", type=float, nargs="+", default=[1.0])
    parser.add_argument("--n-train", type=int, default=3200)  # builtin:instruct-tasks holds 900 distinct 'add' problems
    parser.add_argument("--n-eval", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "forgetting.jsonl")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "forgetting.svg")
    parser.add_argument("--plot-only", action="store_true", help="redraw --plot from --results, run nothing")
    args = parser.parse_args()
    if args.plot_only:
        return plot(args.results, args.plot)
    args.work.mkdir(parents=True, exist_ok=True)
    base, data = base_model(args.work, args.pretrain_steps, args.threads)
    # each EWC lambda / L2-SP alpha is its own run (the Fisher file is estimated once and shared)
    runs = [(v, lam) for v in args.variants
            for lam in (args.ewc_lambda if "ewc" in v else args.l2sp_alpha if "l2sp" in v else [None])]
    for variant, lam in runs:
        method = variant.split("+")[0]
        name = variant.replace("+", "-") + (f"-{lam:g}" if lam is not None else "")
        spec = {"method": method, "base": str(base), "data": str(data),
                "out": str(args.work / "forgetting" / name), "steps": args.steps,
                "lr": LR[method], "overrides": overrides(variant, data, args.work, args, lam), "n_train": args.n_train,
                "n_eval": args.n_eval, "threads": args.threads}
        result = finetune_run(spec)
        knob = {"ewc_lambda": lam} if "ewc" in variant else {"l2sp_alpha": lam} if "l2sp" in variant else \
            {"replay_fraction": args.replay_fraction} if "replay" in variant else {}
        line = json.dumps({"benchmark": "forgetting", "method": variant, **knob,
                           "task_exact_match": result["task_exact_match"], "task_val_loss": result["task_val_loss"],
                           "pretrain_ppl_increase": result["pretrain_ppl_increase"], **result})
        print(line, flush=True)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with args.results.open("a") as f:
            f.write(line + "\n")
        plot(args.results, args.plot)

if __name__ == "__main__":
    main()
