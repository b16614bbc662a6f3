"""`lmstack align`: preference alignment and AI feedback.

    lmstack align rm|dpo|ppo|grpo|rloo --config X.yaml [--section.key=value ...] [--resume]
    lmstack align sft     --task arithmetic|sorted_letters --out DIR        (a starting model for a synthetic task)
    lmstack align label   --judge MODEL_DIR|URL --pairs IN.jsonl --out PREFS.jsonl             (RLAIF)
    lmstack align winrate --judge MODEL_DIR|URL --prompts P.jsonl --policy DIR --reference DIR [--out R.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from lmstack.errors import ConfigError

TRAIN_METHODS = ("rm", "dpo", "ppo", "grpo", "rloo")


def _train(method: str, argv: list[str]) -> int:
    from lmstack.schema import load_config
    from lmstack.train.recipes.align import AlignConfig, run

    parser = argparse.ArgumentParser(prog=f"lmstack align {method}", description=f"Train with {method}.",
                                     epilog="Any other --a.b=value sets a config field, e.g. --train.steps=100 "
                                            "--dpo.loss=ipo.")
    parser.add_argument("--config", help="a YAML AlignConfig (see configs/align-*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if bad:
        raise ConfigError(f"unexpected argument {bad[0]!r}; config overrides look like --train.steps=100")
    cfg = load_config(AlignConfig, args.config, rest, base={"method": method})
    if cfg.method != method:
        raise ConfigError(f"{args.config}: method is {cfg.method!r} but the command is `lmstack align {method}`")
    started = time.perf_counter()
    result, summary = run(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"method": method, "steps": result.steps, "train_loss": result.final_loss,
                          "val_loss": result.val_loss, "wall_s": round(time.perf_counter() - started, 1),
                          "heldout": summary.get("heldout"), "model": summary.get("model")}))
    return 0


def _sft(argv: list[str]) -> int:
    """A starting model for a synthetic task: character tokenizer, small transformer, short SFT on demonstrations."""
    from lmstack.align.task_models import TASKS, train_task_model

    parser = argparse.ArgumentParser(prog="lmstack align sft", description=_sft.__doc__)
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--out", required=True, help="the model directory to write")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    path = train_task_model(args.task, args.out, steps=args.steps, hidden_size=args.hidden_size, seed=args.seed,
                            progress=True)
    print(json.dumps({"task": args.task, "model": str(path), "wall_s": round(time.perf_counter() - started, 1)}))
    return 0


def _judge_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--judge", required=True, help="a model directory, or an OpenAI-compatible base URL (.../v1)")
    parser.add_argument("--judge-model", default="judge", help="the model name to send to a URL judge")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="for a URL judge")
    parser.add_argument("--template", help="a file with the judge prompt ({prompt}, {a}, {b}); default: built in")


def _make_judge(args: argparse.Namespace):
    from lmstack.align.judge import ModelJudge, OpenAIJudge

    if args.judge.startswith(("http://", "https://")):
        return OpenAIJudge(args.judge, args.judge_model, args.api_key)
    from lmstack.interop.hf import load_model
    from lmstack.tokenizer import Tokenizer
    return ModelJudge(load_model(args.judge), Tokenizer.load(args.judge))


def _template(args: argparse.Namespace) -> str:
    from pathlib import Path

    from lmstack.align.judge import JUDGE_TEMPLATE
    return Path(args.template).read_text(encoding="utf-8") if args.template else JUDGE_TEMPLATE


def _label(argv: list[str]) -> int:
    """RLAIF: a judge labels response pairs (both orders must agree) into a preference file for `align dpo`."""
    from pathlib import Path

    from lmstack.align.judge import label_pairs
    from lmstack.atomic import write_text
    from lmstack.data.preference import read_jsonl

    parser = argparse.ArgumentParser(prog="lmstack align label", description=_label.__doc__)
    _judge_flags(parser)
    parser.add_argument("--pairs", required=True, help="JSONL of {prompt, response_a, response_b} (or chosen/rejected)")
    parser.add_argument("--out", required=True, help="the preference JSONL to write (prompt / chosen / rejected)")
    args = parser.parse_args(argv)
    items = []
    for record, where in read_jsonl(args.pairs):
        a, b = record.get("response_a", record.get("chosen")), record.get("response_b", record.get("rejected"))
        if not all(isinstance(x, str) for x in (record.get("prompt"), a, b)):
            raise ConfigError(f"{where}: expected text fields prompt, response_a, response_b (or chosen, rejected)")
        items.append((record["prompt"], a, b))
    records, counts = label_pairs(_make_judge(args), items, _template(args))
    write_text(Path(args.out), "".join(json.dumps(r) + "\n" for r in records))
    print(json.dumps({"pairs": len(items), "labelled": len(records), "disagreed": counts.tie,
                      "off_format": counts.off_format, "out": args.out}))
    return 0


def _winrate(argv: list[str]) -> int:
    """Policy vs reference answers on held-out prompts, judged in both orders: win rate and length-controlled."""
    from pathlib import Path

    from lmstack.align.judge import win_rate
    from lmstack.atomic import write_text
    from lmstack.data.preference import Renderer, read_prompts
    from lmstack.generate import generate
    from lmstack.interop.hf import load_model
    from lmstack.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(prog="lmstack align winrate", description=_winrate.__doc__)
    _judge_flags(parser)
    parser.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field (text or messages)")
    parser.add_argument("--policy", required=True, help="the aligned model directory")
    parser.add_argument("--reference", required=True, help="the model to compare against (e.g. the SFT model)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--limit", type=int, help="use the first N prompts")
    parser.add_argument("--out", help="write the report (JSON, with every answer) here")
    args = parser.parse_args(argv)
    records = read_prompts(args.prompts)[:args.limit]
    answers = {}
    for name in ("policy", "reference"):
        directory = getattr(args, name)
        model, tokenizer = load_model(directory).eval(), Tokenizer.load(directory)
        renderer = Renderer(tokenizer, model.config.max_seq_len)
        out = generate(model, tokenizer, [renderer.prompt_ids(r.prompt) for r in records],
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=0, truncate_prompt=True)
        answers[name] = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out.token_ids]
    texts = [r.prompt if isinstance(r.prompt, str) else r.prompt[-1]["content"] for r in records]
    report = win_rate(_make_judge(args), texts, answers["policy"], answers["reference"], _template(args))
    if args.out:
        detail = [{"prompt": p, "policy": a, "reference": b} for p, a, b in zip(texts, answers["policy"],
                                                                                  answers["reference"])]
        write_text(Path(args.out), json.dumps({**report, "answers": detail}, indent=1) + "\n")
    print(json.dumps(report))
    return 0


def main(argv: list[str]) -> int:
    """Align a model: rm | dpo | ppo | grpo | rloo training, label (AI-feedback pairs), winrate (judge)."""
    verbs = TRAIN_METHODS + ("sft", "label", "winrate")
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb in TRAIN_METHODS:
        return _train(verb, rest)
    if verb == "sft":
        return _sft(rest)
    if verb == "label":
        return _label(rest)
    if verb == "winrate":
        return _winrate(rest)
    raise ConfigError(f"unknown align command {verb!r}; choose one of {', '.join(verbs)}")
