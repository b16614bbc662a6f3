"""`lmstack quickstart`: from nothing to a chatting model with a report, on the built-in corpus, in minutes."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lmstack.cli.args import add_out, integer, positive_int, positive_number
from lmstack.config import PRESETS
from lmstack.errors import ConfigError
from lmstack.quickstart import QUICKSTART_MODEL, QuickstartPlan, run_quickstart, say
from lmstack.tokenizer import SpecialTokens

DEFAULTS = QuickstartPlan()


def main(argv: list[str]) -> int:
    """From nothing to a chatting model: prepare the built-in corpus, train a tokenizer and a model, sample, report."""
    parser = argparse.ArgumentParser(prog="lmstack quickstart", description=main.__doc__, allow_abbrev=False)
    add_out(parser, default="runs/quickstart", help="output (a Hugging Face model directory) [%(default)s]")
    parser.add_argument("--minutes", type=positive_number, help="time budget for the whole run (data, training, "
                        f"samples, report), in minutes [{DEFAULTS.minutes:g}]")
    parser.add_argument("--steps", type=positive_int, help="train exactly this many steps instead of what fits "
                        "--minutes")
    parser.add_argument("--preset", choices=sorted(PRESETS), metavar="PRESET",
                        help="a model preset instead of the default ~4M-parameter model (3.95M at --vocab-size 4096): "
                        + ", ".join(sorted(PRESETS)))
    parser.add_argument("--corpus", nargs="+", help="builtin:python-docs, or your own text files / directories / "
                        f"JSONL [{' '.join(DEFAULTS.corpus)}]")
    parser.add_argument("--vocab-size", type=positive_int, help=f"BPE vocabulary size [{DEFAULTS.vocab_size}]")
    parser.add_argument("--seq-len", type=positive_int, help=f"tokens per training window [{DEFAULTS.seq_len}]")
    parser.add_argument("--batch-size", type=positive_int, help=f"windows per step [{DEFAULTS.batch_size}]")
    parser.add_argument("--seed", type=integer, help=f"seed of the model's initialisation and the batches "
                        f"[{DEFAULTS.seed}]")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out with the options it was "
                       "started with (running the same command again does the same)")
    again.add_argument("--restart", action="store_true", help="delete the run in --out and start over")
    args = parser.parse_args(argv)

    given = {name for name in ("minutes", "steps", "preset", "corpus", "vocab_size", "seq_len", "batch_size", "seed")
             if getattr(args, name) is not None}
    plan = _plan(args)
    out = Path(args.out)
    started = time.perf_counter()
    try:
        report = run_quickstart(plan, out, given=given, resume=args.resume, restart=args.restart)
    except KeyboardInterrupt:
        say(f"interrupted: finished stages and the last checkpoint are kept in {out}; "
            f"`lmstack quickstart --out {out} --resume` continues the run")
        return 130
    say(f"done in {time.perf_counter() - started:.0f} s. Report: {report}\n"
        f"  chat with it:  lmstack chat --model {out}\n"
        f"  load it:       transformers.AutoModelForCausalLM.from_pretrained('{out}')")
    return 0


def _plan(args: argparse.Namespace) -> QuickstartPlan:
    """The options -> the run's plan (defaults filled in), checked before anything is written."""
    vocab_size = args.vocab_size or DEFAULTS.vocab_size
    smallest = 256 + len(SpecialTokens.default("bpe").all())  # byte-level BPE: every byte plus the specials
    if vocab_size < smallest:
        raise ConfigError(f"--vocab-size {vocab_size}: a byte-level BPE vocabulary needs at least {smallest} tokens "
                          "(256 bytes + the special tokens)")
    model = dict(QUICKSTART_MODEL)
    if args.preset is not None:
        # vocabulary and special ids come from the tokenizer trained on the data
        model = {k: v for k, v in PRESETS[args.preset].items()
                 if k not in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    seq_len = args.seq_len or DEFAULTS.seq_len
    model["max_seq_len"] = max(model.get("max_seq_len", 0), seq_len)
    return QuickstartPlan(corpus=args.corpus or DEFAULTS.corpus, vocab_size=vocab_size, preset=args.preset,
                          model=model, seq_len=seq_len, batch_size=args.batch_size or DEFAULTS.batch_size,
                          steps=args.steps or 0, minutes=args.minutes or DEFAULTS.minutes,
                          seed=args.seed if args.seed is not None else DEFAULTS.seed)
