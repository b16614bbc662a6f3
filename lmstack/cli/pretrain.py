"""`lmstack pretrain`: train a causal language model from scratch on prepared token shards.

    lmstack pretrain --config configs/tiny-python-docs.yaml [--out DIR] [--train.steps=100 --data.path=DIR ...]
    lmstack pretrain --config ... --resume          (continue from OUT/checkpoints/latest)
    lmstack pretrain --config ... --print-config    (the effective config as YAML)
    torchrun --nproc_per_node=2 -m lmstack pretrain --config ... [--train.distributed=fsdp]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lmstack.cli.args import PRINT_CONFIG_HELP, add_out, print_config
from lmstack.errors import ConfigError, LmstackError
from lmstack.schema import load_config, read_json
from lmstack.train.config import PretrainConfig
from lmstack.train.recipes.pretrain import run


def main(argv: list[str]) -> int:
    """Pretrain a causal LM on token shards: --config X.yaml [--section.key=value ...] [--resume]; torchrun for DDP/FSDP."""
    parser = argparse.ArgumentParser(prog="lmstack pretrain", description=main.__doc__, allow_abbrev=False,
                                     epilog="Any other --a.b=value sets a config field, e.g. --train.steps=100.")
    parser.add_argument("--config", help="a YAML PretrainConfig (see configs/)")
    add_out(parser, help="output directory: config.yaml, metrics.jsonl, loss.png, checkpoints/ (the config's out_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output "
                        "directory")
    parser.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if bad:
        raise ConfigError(f"unexpected argument {bad[0]!r}; config overrides look like --train.steps=100")
    if args.out is not None:
        rest.append(f"--out_dir={args.out}")
    cfg = load_config(PretrainConfig, args.config, rest)
    if args.print_config:
        return print_config(_effective(cfg))
    started = time.perf_counter()
    result = run(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"steps": result.steps, "train_loss": result.final_loss, "val_loss": result.val_loss,
                          "best_val_loss": result.best_val_loss, "wall_s": round(time.perf_counter() - started, 1),
                          "checkpoint": str(result.checkpoint) if result.checkpoint else None}))
        if result.checkpoint is not None:
            print(next_steps(Path(cfg.out_dir), Path(result.checkpoint)), file=sys.stderr)
    return 0


def _effective(cfg: PretrainConfig) -> dict:
    """The config as the run would use it: with the model section resolved against the data, where readable."""
    from lmstack.data.loader import TokenStream
    from lmstack.schema import to_dict
    from lmstack.train.recipes.pretrain import build_model_config

    data = to_dict(cfg)
    try:
        info = TokenStream(Path(cfg.data.path) / "train").info if cfg.data.path else None
    except LmstackError:
        info = None
    if info is not None:
        data["model"] = build_model_config(cfg.model, info.vocab_size, info.eos_token_id).to_dict()
    return data


def next_steps(out_dir: Path, checkpoint: Path) -> str:
    """What to do with a finished run: where its model is and the command that talks to it."""
    latest = out_dir / "checkpoints" / "latest"
    model = latest if latest.is_symlink() else checkpoint
    try:
        has_template = (checkpoint / "chat_template.jinja").exists() or bool(
            read_json(checkpoint / "tokenizer_config.json").get("chat_template"))
    except (LmstackError, AttributeError):
        has_template = False
    lines = [f"lmstack pretrain: final checkpoint {checkpoint}"
             + (f" (also {latest})" if model == latest else "")
             + (f"; best by validation loss: {out_dir / 'checkpoints' / 'best'}"
                if (out_dir / "checkpoints" / "best").is_symlink() else "")]
    if has_template:
        lines.append(f"  chat with it:      lmstack chat --model {model}")
    if (checkpoint / "tokenizer.json").exists():
        lines.append(f"  generate with it:  lmstack generate --model {model} --prompt 'Once upon a time'")
    return "\n".join(lines)
