"""One comparison of every fine-tuning method on one task, one base model and one seed (issue 12's table).

The task and base are benchmarks/finetune_quality.py's arithmetic suite: a 0.6M-parameter character model
pretrained on plain equations "a+b=c" (usable pairs only) + tinyshakespeare, cached in runs/ft-arith/base, which
each method fine-tunes on the instruction-phrased usable pairs ("What is 47 plus 38?" -> "85", ChatML) for the same
steps, batch, row length and seed, in its own process (its peak memory its own). Per method one JSON line:
trainable parameters, peak memory (the process's RSS high-water mark: mostly torch itself at this size), training
tokens/s (median of the logged steps after the first quarter), the task (greedy exact match on 400 held-out pairs,
none of them seen in pretraining or fine-tuning, and the held-out answer loss) and forgetting (the perplexity of
the base's own pretraining validation split, base vs fine-tuned with its adapter merged or applied).

Rows are 108 tokens (not finetune_quality's 128) so that the 20 virtual tokens of prompt, P- and prefix tuning fit
the base's 128-token context, and every method sees the same rows.

    python benchmarks/peft_methods.py                                   # 9 methods, 600 steps each, ~3-4 min each
    python benchmarks/peft_methods.py --methods prompt ia3 --lr 1e-1    # another learning rate for some
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import time
from pathlib import Path

from adapt_runs import ROOT, cpu_info, finetune_run, pretrain_val_ppl
from finetune_quality import (arithmetic_problems, arithmetic_train_file, chat_answers, finetune_args, peak_rss_mib,
                              pretrain_arithmetic)

METHODS = ["full", "lora", "dora", "qlora", "prompt", "p_tuning", "prefix", "bottleneck", "ia3"]
# the first learning rate tried per method: finetune_quality's for full and the LoRA family; the prompt-style
# methods and IA3 train few parameters and take larger ones (their papers' and peft's examples' ranges)
LR = {"full": 2e-3, "lora": 3e-3, "dora": 3e-3, "qlora": 3e-3, "prompt": 3e-2, "p_tuning": 1e-2, "prefix": 1e-2,
      "bottleneck": 3e-3, "ia3": 3e-2}
OVERRIDES = {"prompt": ["--prompt_tuning.num_virtual_tokens=20"], "p_tuning": ["--p_tuning.num_virtual_tokens=20"],
             "prefix": ["--prefix_tuning.num_virtual_tokens=20"], "bottleneck": ["--bottleneck.reduction_factor=8"]}


def answer_losses(model, tokenizer, problems: list[dict]) -> tuple[float, float]:
    """Mean cross-entropy of the held-out answers (+ <|im_end|>) given their ChatML prompts, which moves before
    exact match does; and of the answers' digits alone (the sum, without the stop)."""
    import torch
    import torch.nn.functional as F

    end = [tokenizer.token_to_id("<|im_end|>")]
    total, digits, count, digit_count = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for problem in problems:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": problem["prompt"]}],
                                                   add_generation_prompt=True)
            p_ids = tokenizer.encode(prompt, add_special_tokens=False)
            a_ids = tokenizer.encode(problem["completion"], add_special_tokens=False) + end
            ids = torch.tensor([p_ids + a_ids])  # (1, T)
            logits = model(ids[:, :-1])[0, len(p_ids) - 1:].float()  # (len(a_ids), V): the answer's predictions
            losses = F.cross_entropy(logits, ids[0, len(p_ids):], reduction="none")  # (len(a_ids),)
            total, count = total + losses.sum().item(), count + len(a_ids)
            digits, digit_count = digits + losses[:-1].sum().item(), digit_count + len(a_ids) - 1
    return total / count, digits / digit_count


def sum_first(text: str, answer: str) -> bool:
    """The generation starts with the answer and no further digit, whatever follows (a model that computes the sum
    but never emits <|im_end|>)."""
    head = re.match(r"\s*(\d+)", text)
    return head is not None and head.group(1) == answer


def worker(spec: dict) -> dict:
    """One method's run (spec: method, lr, base, data, train_file, out, steps, batch_size, seq_len, n_eval,
    threads), measured."""
    import torch

    from lmstack.adapters import unload
    from lmstack.data.instruct_tasks import exact_match
    from lmstack.interop.hf import load_model
    from lmstack.schema import load_config
    from lmstack.tokenizer import Tokenizer
    from lmstack.train.recipes.finetune import FinetuneConfig, build_engine

    torch.set_num_threads(spec["threads"])
    out, data, seq_len = Path(spec["out"]), Path(spec["data"]), spec["seq_len"]
    if out.exists():  # a benchmark run starts afresh
        shutil.rmtree(out)
    before = pretrain_val_ppl(load_model(spec["base"]), data, spec["ppl_windows"], seq_len)
    args = finetune_args(spec["method"], spec["base"], out, [f"--data.train={spec['train_file']}"], spec["lr"],
                         spec["steps"], spec["batch_size"], seq_len, spec["threads"])
    cfg = load_config(FinetuneConfig, None, args + ["--train.log_every=10", *OVERRIDES.get(spec["method"], [])])
    started = time.perf_counter()
    engine = build_engine(cfg)
    result = engine.fit()
    minutes = (time.perf_counter() - started) / 60
    model = engine.base_model.eval()
    if spec["method"] != "full":
        model = unload(model)  # LoRA / DoRA / QLoRA / IA3 folded into the weights; the others stay in place, frozen
    after = pretrain_val_ppl(model, data, spec["ppl_windows"], seq_len)
    tokenizer = Tokenizer.load(out / "tokenizer")
    problems = arithmetic_problems(spec["n_eval"])
    texts = chat_answers(model, tokenizer, problems)
    correct = sum(exact_match(t, p["completion"]) for t, p in zip(texts, problems))
    first = sum(sum_first(t, p["completion"]) for t, p in zip(texts, problems))
    loss, digit_loss = answer_losses(model, tokenizer, problems)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if r.get("kind") == "train" and r.get("tokens_per_s")]
    report = json.loads((out / "data_report.json").read_text())
    return {"trainable_params": report["trainable_parameters"], "total_params": report["total_parameters"],
            "peak_mem_mib": peak_rss_mib(),
            "tokens_per_s": round(statistics.median(speeds[len(speeds) // 4:]), 1) if speeds else None,
            "task_exact_match": round(correct / len(problems), 4),
            "task_sum_first": round(first / len(problems), 4), "task_val_loss": round(loss, 4),
            "task_digit_loss": round(digit_loss, 4),
            "final_train_loss": round(result.final_loss, 4), "pretrain_val_ppl_before": round(before, 4),
            "pretrain_val_ppl_after": round(after, 4), "pretrain_ppl_increase": round(after - before, 4),
            "minutes": round(minutes, 2), "steps": spec["steps"], "batch_size": spec["batch_size"],
            "seq_len": seq_len, "epochs": report["epochs"], "heldout_problems": len(problems),
            "threads": torch.get_num_threads(), "examples": [[p["prompt"], t] for p, t in zip(problems[:2], texts)],
            **cpu_info()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "peft-methods")
    parser.add_argument("--base-work", type=Path, default=ROOT / "runs" / "ft-arith",
                        help="finetune_quality's arithmetic work dir: the base and its pretraining shards (cached)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--lr", type=float, help="one learning rate for the methods named (default: LR above)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=108, help="tokens per packed row (+ 20 virtual <= 128)")
    parser.add_argument("--n-eval", type=int, default=400)
    parser.add_argument("--ppl-windows", type=int, default=128, help="pretraining validation windows of seq-len")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, help="append each line here too (default: WORK/results.jsonl)")
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    base = pretrain_arithmetic(args.base_work.resolve(), 2400, args.threads)  # cached: finetune_quality's base
    train_file = arithmetic_train_file(args.work)
    for method in args.methods:
        lr = args.lr or LR[method]
        spec = {"method": method, "lr": lr, "base": str(base), "data": str(base.parent / "pretrain-data"),
                "train_file": str(train_file), "out": str(args.work / f"{method}-lr{lr:g}"), "steps": args.steps,
                "batch_size": args.batch_size, "seq_len": args.seq_len, "n_eval": args.n_eval,
                "ppl_windows": args.ppl_windows, "threads": args.threads}
        line = json.dumps({"benchmark": "peft_methods", "method": method, "lr": lr,
                           **finetune_run(spec, worker="peft_methods")})
        print(line, flush=True)
        with open(args.results or args.work / "results.jsonl", "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
