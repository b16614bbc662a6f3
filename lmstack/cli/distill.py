"""`lmstack distill`: train a student language model on token shards against a larger teacher.

    lmstack distill --config configs/distill-tiny.yaml [--distill.alpha=0.5 --distill.top_k=32 ...] [--resume]
"""

from __future__ import annotations

import argparse
import json
import time

from lmstack.errors import ConfigError
from lmstack.schema import load_config


def main(argv: list[str]) -> int:
    """Distil a teacher into a student: --config X.yaml [--section.key=value ...] [--resume]."""
    from lmstack.train.recipes.distill import DistillConfig, run

    parser = argparse.ArgumentParser(prog="lmstack distill", description=main.__doc__,
                                     epilog="Any other --a.b=value sets a config field, e.g. --distill.temperature=4.")
    parser.add_argument("--config", help="a YAML DistillConfig (see configs/distill-*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if bad:
        raise ConfigError(f"unexpected argument {bad[0]!r}; config overrides look like --train.steps=100")
    cfg = load_config(DistillConfig, args.config, rest)
    started = time.perf_counter()
    result = run(cfg, resume=args.resume)
    print(json.dumps({"steps": result.steps, "train_loss": result.final_loss, "val_loss": result.val_loss,
                      "wall_s": round(time.perf_counter() - started, 1),
                      "checkpoint": str(result.checkpoint) if result.checkpoint else None}))
    return 0
