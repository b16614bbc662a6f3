"""`lmstack pretrain`: train a causal language model from scratch on prepared token shards.

    lmstack pretrain --config configs/tiny-python-docs.yaml [--train.steps=100 --data.path=DIR ...] [--resume]
    torchrun --nproc_per_node=2 -m lmstack pretrain --config ... [--train.distributed=fsdp]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from lmstack.errors import ConfigError
from lmstack.schema import load_config
from lmstack.train.config import PretrainConfig
from lmstack.train.recipes.pretrain import run


def main(argv: list[str]) -> int:
    """Pretrain a causal LM on token shards: --config X.yaml [--section.key=value ...] [--resume]; torchrun for DDP/FSDP."""
    parser = argparse.ArgumentParser(prog="lmstack pretrain", description=main.__doc__,
                                     epilog="Any other --a.b=value sets a config field, e.g. --train.steps=100.")
    parser.add_argument("--config", help="a YAML PretrainConfig (see configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if bad:
        raise ConfigError(f"unexpected argument {bad[0]!r}; config overrides look like --train.steps=100")
    cfg = load_config(PretrainConfig, args.config, rest)
    started = time.perf_counter()
    result = run(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"steps": result.steps, "train_loss": result.final_loss, "val_loss": result.val_loss,
                          "best_val_loss": result.best_val_loss, "wall_s": round(time.perf_counter() - started, 1),
                          "checkpoint": str(result.checkpoint) if result.checkpoint else None}))
    return 0
