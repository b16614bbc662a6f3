"""Catastrophic forgetting, measured and mitigated: the task learned vs the pretraining perplexity lost.

On the base of benchmarks/adapt_runs.py (a character model pretrained here on tinyshakespeare + Emma), each
variant fine-tunes on `builtin:instruct-tasks` for the same steps: full fine-tuning, LoRA, full + replay
(a quarter of each micro-batch's rows from the pretraining shards), full + EWC (Fisher on 64 pretraining
windows) and full + L2-SP. Reported per variant: the task (exact match on held-out problems, held-out
assistant-token loss) and the increase of the pretraining validation perplexity. One JSON line per variant.

    python benchmarks/forgetting.py                               # 5 variants, 100 steps each (short)
    python benchmarks/forgetting.py --steps 600 --ewc-lambda 5000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adapt_runs import ROOT, base_model, finetune_run

VARIANTS = ["full", "lora", "full+replay", "full+ewc", "full+l2sp", "lora+replay"]
LR = {"full": 2e-3, "lora": 5e-3}


def overrides(variant: str, data: Path, work: Path, args) -> list[str]:
    extra = []
    if "replay" in variant:
        extra += [f"--forgetting.replay_data={data}", f"--forgetting.replay_fraction={args.replay_fraction}"]
    if "ewc" in variant:
        extra += [f"--forgetting.ewc_lambda={args.ewc_lambda}", f"--forgetting.ewc_fisher={work / 'fisher.safetensors'}",
                  f"--forgetting.ewc_data={data}", "--forgetting.ewc_windows=64"]
    if "l2sp" in variant:
        extra += [f"--forgetting.l2sp_alpha={args.l2sp_alpha}"]
    return extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "adapt")
    parser.add_argument("--variants", nargs="+", default=VARIANTS[:5], choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--replay-fraction", type=float, default=0.25)
    parser.add_argument("--ewc-lambda", type=float, default=1000.0)
    parser.add_argument("--l2sp-alpha", type=float, default=1.0)
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--n-eval", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base, data = base_model(args.work, args.pretrain_steps, args.threads)
    for variant in args.variants:
        method = variant.split("+")[0]
        spec = {"method": method, "base": str(base), "data": str(data),
                "out": str(args.work / "forgetting" / variant.replace("+", "-")), "steps": args.steps,
                "lr": LR[method], "overrides": overrides(variant, data, args.work, args), "n_train": args.n_train,
                "n_eval": args.n_eval, "threads": args.threads}
        result = finetune_run(spec)
        print(json.dumps({"benchmark": "forgetting", "method": variant, "task_exact_match": result["task_exact_match"],
                          "task_val_loss": result["task_val_loss"],
                          "pretrain_ppl_increase": result["pretrain_ppl_increase"], **result}), flush=True)


if __name__ == "__main__":
    main()
