"""`lmstack quickstart`: from nothing to a chatting model with a report, on the built-in corpus, in minutes."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lmstack.config import PRESETS
from lmstack.errors import ConfigError
from lmstack.quickstart import QUICKSTART_MODEL, QuickstartPlan, run_quickstart, say


def main(argv: list[str]) -> int:
    """From nothing to a chatting model: prepare the built-in corpus, train a tokenizer and a model, sample, report."""
    parser = argparse.ArgumentParser(prog="lmstack quickstart", description=main.__doc__)
    parser.add_argument("--out", default="runs/quickstart", help="output (a Hugging Face model directory) [%(default)s]")
    parser.add_argument("--minutes", type=float, default=8.0,
                        help="time budget for the whole run (data, training, samples, report), in minutes [%(default)s]")
    parser.add_argument("--preset", default=None,
                        help=f"model preset instead of the ~4.5M default ({', '.join(sorted(PRESETS))})")
    parser.add_argument("--corpus", nargs="+", default=["builtin:python-docs"],
                        help="builtin:python-docs, or your own text files / directories / JSONL [%(default)s]")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size [%(default)s]")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training window [%(default)s]")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per step [%(default)s]")
    parser.add_argument("--steps", type=int, default=0, help="fixed step count instead of the time budget")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        raise ConfigError(f"--minutes must be positive, got {args.minutes}")
    model = dict(QUICKSTART_MODEL)
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise ConfigError(f"--preset: unknown preset {args.preset!r} (known: {', '.join(sorted(PRESETS))})")
        # vocabulary and special ids come from the tokenizer trained on the data
        model = {k: v for k, v in PRESETS[args.preset].items()
                 if k not in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    model["max_seq_len"] = max(model.get("max_seq_len", 0), args.seq_len)
    plan = QuickstartPlan(corpus=args.corpus, vocab_size=args.vocab_size, model=model, seq_len=args.seq_len,
                          batch_size=args.batch_size, steps=args.steps, minutes=args.minutes, seed=args.seed)
    out = Path(args.out)
    started = time.perf_counter()
    try:
        report = run_quickstart(plan, out)
    except KeyboardInterrupt:
        say(f"interrupted: finished stages and the last checkpoint are kept in {out}; "
             "run the same command again to resume")
        return 130
    say(f"done in {time.perf_counter() - started:.0f} s. Report: {report}\n"
         f"  chat with it:  lmstack chat --model {out}\n"
         f"  load it:       transformers.AutoModelForCausalLM.from_pretrained('{out}')")
    return 0
