"""Knowledge distillation, measured: a small student distilled from a larger lmstack-pretrained teacher vs the same
student trained from scratch on the same windows (validation perplexity and minutes).

Teacher: the base of benchmarks/adapt_runs.py (4 layers, width 128, 0.8M parameters, pretrained here on
tinyshakespeare + Emma). Student: 2 layers, width 64. Both student runs use `lmstack distill` with the same
seed, windows (the first steps x 8 windows of the data: one epoch) and steps; the distilled one mixes the hard
labels with the teacher's top-k logits (cached once)
at temperature T (alpha), the baseline sets alpha = 0. One JSON line per run; the distilled line carries the
baseline's figures and the ratio of validation perplexities.

    python benchmarks/distill.py                                 # 200 steps per run (short)
    python benchmarks/distill.py --steps 1500 --alpha 0.7 --temperature 2
    python benchmarks/distill.py --steps 600 --settings 0.3:2 0.7:2   # a sweep: one distilled run per alpha:T

The scratch run's line is kept in WORK/distill/scratch-STEPS.json and reused by a later sweep with the same steps
and lr (its line then says "reused": true); the teacher's top-k cache is computed once and copied into every
distilled run of the same windows (its key, checked by lmstack, does not depend on alpha or T).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

from adapt_runs import ROOT, base_model, cpu_info

STUDENT = ["--student.preset=llama-tiny", "--student.hidden_size=64", "--student.num_layers=2",
           "--student.num_heads=4", "--student.num_kv_heads=4", "--student.intermediate_size=172",
           "--student.max_seq_len=256", "--student.tie_word_embeddings=true"]


def run(work: Path, teacher: Path, data: Path, name: str, alpha: float, temperature: float, args) -> dict:
    import torch

    from lmstack.schema import load_config
    from lmstack.train.recipes.distill import DistillConfig, build_engine

    out = work / "distill" / name
    cfg = load_config(DistillConfig, None, [
        f"--out_dir={out}", f"--teacher={teacher}", f"--data.path={data}", *STUDENT, f"--distill.alpha={alpha}",
        f"--distill.temperature={temperature}", f"--distill.top_k={args.top_k}", f"--optim.lr={args.lr}",
        f"--distill.max_windows={args.steps * 8}",  # one epoch of windows: the teacher's pass covers what is used
        "--schedule.warmup_steps=30", f"--train.steps={args.steps}", "--train.batch_size=8", "--train.seq_len=256",
        "--train.eval_every=0", "--train.eval_windows=64", f"--train.threads={args.threads}",
        "--train.progress=false"])
    shared_cache = work / "distill" / f"teacher_topk-k{args.top_k}-w{args.steps * 8}.safetensors"
    if out.exists():
        shutil.rmtree(out)
    reused = alpha > 0 and args.top_k > 0 and shared_cache.is_file()  # top_k 0: the live teacher, no cache
    if reused:
        out.mkdir(parents=True)
        shutil.copyfile(shared_cache, out / "teacher_topk.safetensors")
    started = time.perf_counter()
    engine = build_engine(cfg)
    setup = time.perf_counter() - started  # the teacher's top-k pass over every window (distilled run only)
    result = engine.fit()
    minutes = (time.perf_counter() - started) / 60
    if alpha > 0 and args.top_k > 0 and not reused:
        shutil.copyfile(out / "teacher_topk.safetensors", shared_cache)
    return {"benchmark": "distill", "run": name, "alpha": alpha, "temperature": temperature,
            "top_k": args.top_k if alpha > 0 else None, "steps": args.steps,
            "student_params": engine.base_model.num_parameters(), "val_loss": round(result.val_loss, 4),
            "val_ppl": round(math.exp(result.val_loss), 4), "minutes": round(minutes, 2),
            "teacher_cache_minutes": round(setup / 60, 2) if alpha > 0 else 0.0, "teacher_cache_reused": reused,
            "threads": torch.get_num_threads(), **cpu_info()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "adapt")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--settings", nargs="+", default=None, metavar="ALPHA:T",
                        help="distilled runs to make (default: the one --alpha:--temperature)")
    parser.add_argument("--top-k", type=int, default=16, help="0: the live teacher on every batch, full vocabulary")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    teacher, data = base_model(args.work, args.pretrain_steps, args.threads)
    teacher_info = json.loads((args.work / "base-pretrain.json").read_text()) \
        if (args.work / "base-pretrain.json").exists() else {}
    settings = [tuple(map(float, x.split(":"))) for x in args.settings] if args.settings \
        else [(args.alpha, args.temperature)]
    kept = args.work / "distill" / f"scratch-{args.steps}.json"
    scratch = json.loads(kept.read_text()) if kept.is_file() else None
    if scratch is not None and scratch.get("lr") == args.lr:
        scratch["reused"] = True
    else:
        scratch = {**run(args.work, teacher, data, "scratch", 0.0, args.temperature, args), "lr": args.lr}
        kept.write_text(json.dumps(scratch))
    print(json.dumps(scratch), flush=True)
    for alpha, temperature in settings:
        distilled = run(args.work, teacher, data, f"distilled-a{alpha:g}-T{temperature:g}" + ("" if args.top_k else "-full"), alpha, temperature, args)
        distilled.update({"lr": args.lr, "peer": "same student from scratch", "peer_val_ppl": scratch["val_ppl"],
                          "peer_minutes": scratch["minutes"],
                          "ppl_ratio": round(distilled["val_ppl"] / scratch["val_ppl"], 4),
                          "teacher_val_ppl": round(math.exp(teacher_info["val_loss"]), 4) if teacher_info else None})
        print(json.dumps(distilled), flush=True)


if __name__ == "__main__":
    main()
