"""`lmstack finetune`: instruction fine-tuning (full, LoRA, DoRA, QLoRA) from a YAML config, or with
`task: classification` an encoder's sequence classification (full, LoRA; lmstack.train.recipes.classify).

    lmstack finetune --config configs/finetune-alpaca.yaml [--method=dora --train.steps=100 ...] [--resume]
    lmstack finetune --config configs/classify-authors-minilm.yaml [--method=lora ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from lmstack.errors import ConfigError
from lmstack.schema import load_config, load_yaml, parse_override
from lmstack.train.recipes.finetune import FinetuneConfig, run


def main(argv: list[str]) -> int:
    """Fine-tune a model on instruction data: --config X.yaml [--section.key=value ...] [--resume]."""
    parser = argparse.ArgumentParser(prog="lmstack finetune", description=main.__doc__,
                                     epilog="Any other --a.b=value sets a config field, e.g. --method=dora --lora.r=8.")
    parser.add_argument("--config", help="a YAML FinetuneConfig (see configs/finetune-*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if bad:
        raise ConfigError(f"unexpected argument {bad[0]!r}; config overrides look like --train.steps=100")
    if _task(args.config, rest) == "classification":
        return _classify(args.config, rest, args.resume)
    cfg = load_config(FinetuneConfig, args.config, rest)
    started = time.perf_counter()
    result = run(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        checkpoint = str(result.checkpoint) if result.checkpoint else None
        print(json.dumps({"method": cfg.method, "steps": result.steps, "train_loss": result.final_loss,
                          "val_loss": result.val_loss, "wall_s": round(time.perf_counter() - started, 1),
                          "checkpoint": checkpoint}))
        if checkpoint and cfg.method != "full":
            print(f"chat with it:  lmstack chat --model {cfg.model} --adapter {checkpoint}\n"
                  f"merge it:      lmstack merge --model {cfg.model} --adapter {checkpoint} --out MERGED_DIR")
        elif checkpoint:
            print(f"chat with it:  lmstack chat --model {checkpoint}")
    return 0


def _task(path: str | None, overrides: list[str]) -> str:
    """`task:` from the overrides or the YAML file (default sft): which config class reads the rest."""
    for text in overrides:
        keys, value = parse_override(text)
        if keys == ["task"]:
            return str(value)
    return str(load_yaml(path).get("task", "sft")) if path else "sft"


def _classify(path: str | None, overrides: list[str], resume: bool) -> int:
    from lmstack.train.recipes.classify import ClassifyConfig
    from lmstack.train.recipes.classify import run as run_classify

    cfg = load_config(ClassifyConfig, path, overrides)
    started = time.perf_counter()
    result = run_classify(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        checkpoint = str(result.checkpoint) if result.checkpoint else None
        metrics = Path(cfg.out_dir) / "metrics.jsonl"
        evals = [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("kind") == "eval"] \
            if metrics.is_file() else []
        print(json.dumps({"task": "classification", "method": cfg.method, "steps": result.steps,
                          "train_loss": result.final_loss, "val_loss": result.val_loss,
                          "val_accuracy": evals[-1].get("val_accuracy") if evals else None,
                          "wall_s": round(time.perf_counter() - started, 1), "checkpoint": checkpoint}))
    return 0
