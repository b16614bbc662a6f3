"""`lmstack finetune`: instruction fine-tuning (full, LoRA, DoRA, QLoRA) from a YAML config.

    lmstack finetune --config configs/finetune-alpaca.yaml [--method=dora --train.steps=100 ...] [--resume]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from lmstack.errors import ConfigError
from lmstack.schema import load_config
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
