"""One comparison of every fine-tuning method on one task and one base model (issue 12's table).

On the base of benchmarks/adapt_runs.py (a 0.8M-parameter character model pretrained here), each method
fine-tunes on `builtin:instruct-tasks` for the same steps and batch, in its own process, and reports:
trainable parameters, peak memory (the process's RSS high-water mark: mostly torch itself at this size),
tokens/s, the task (exact match on held-out problems, held-out assistant-token loss) and forgetting (the
pretraining validation perplexity after minus before). One JSON line per method.

    python benchmarks/peft_methods.py                            # 9 methods, 100 steps each (short)
    python benchmarks/peft_methods.py --methods lora prefix --steps 600
"""

from __future__ import annotations

import argparse
import json

from adapt_runs import ROOT, base_model, finetune_run

METHODS = ["full", "lora", "dora", "qlora", "prompt", "p_tuning", "prefix", "bottleneck", "ia3"]
# learning rates per method, from the methods' papers' ranges (prompt-style methods and IA3 take larger ones)
LR = {"full": 2e-3, "lora": 5e-3, "dora": 5e-3, "qlora": 5e-3, "prompt": 3e-2, "p_tuning": 1e-2, "prefix": 1e-2,
      "bottleneck": 5e-3, "ia3": 3e-2}
OVERRIDES = {"prompt": ["--prompt_tuning.num_virtual_tokens=20"], "p_tuning": ["--p_tuning.num_virtual_tokens=20"],
             "prefix": ["--prefix_tuning.num_virtual_tokens=20"], "bottleneck": ["--bottleneck.reduction_factor=8"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=__import__("pathlib").Path, default=ROOT / "runs" / "adapt")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--n-train", type=int, default=3200)  # the generator holds 900 distinct additions: 4 x 800 fits
    parser.add_argument("--n-eval", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base, data = base_model(args.work, args.pretrain_steps, args.threads)
    for method in args.methods:
        spec = {"method": method, "base": str(base), "data": str(data), "out": str(args.work / "methods" / method),
                "steps": args.steps, "lr": LR[method], "overrides": OVERRIDES.get(method, []),
                "n_train": args.n_train, "n_eval": args.n_eval, "threads": args.threads}
        print(json.dumps({"benchmark": "peft_methods", "method": method, "lr": LR[method], **finetune_run(spec)}),
              flush=True)


if __name__ == "__main__":
    main()
