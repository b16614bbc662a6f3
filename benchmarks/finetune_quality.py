"""Instruction-tuning quality: a small pretrained model learns a verifiable task with full, LoRA, DoRA and QLoRA.

1. A base model: a 3.2M-parameter character-level Llama-style model (4 layers, width 256) pretrained on
   tinyshakespeare + Jane Austen's Emma (../shared/data) + 1.3 MB of drills (`instruct_tasks.pretraining_lines`:
   the task prompts without answers, words and digit strings said twice, counting): 400 steps of 16 x 128
   characters, one thread; or --base DIR. A copy probe (greedy continuations of unseen drills) says whether
   the base can copy from its context, which every task needs.
2. For each method, `lmstack finetune` on `builtin:instruct-tasks` (two-digit addition, sorting digits,
   reversing and capitalising short words, phrased as instructions; ChatML markers added to the base's
   vocabulary as trainable rows), each method in its own process (peak memory = that process's).
3. Exact match of greedy answers on held-out problems (none of whose prompts is in the training set), batched
   generation (lmstack.generate with 100 prompts at a time).

Prints one JSON line for the base (its copy probe) and one per method: accuracy (and per task kind), minutes, peak memory, final training loss.

    python benchmarks/finetune_quality.py                         # pretrain once (cached), then 4 methods
    python benchmarks/finetune_quality.py --methods lora --sft-steps 300

--suite arithmetic: a task a small base can do, so the table measures what SFT teaches (the format, when to stop).
The 8,100 two-digit + two-digit pairs are split once (seeded shuffle): 1,620 held out, never seen anywhere; the
base (a 0.6M-parameter character model, 3 layers, width 128) is pretrained on plain equations "a+b=c" of the
usable pairs mixed with tinyshakespeare, and its greedy accuracy on held-out "a+b=" is reported; each method then
fine-tunes on instruction-phrased usable pairs ("What is 47 plus 38?" -> "85", ChatML; 600 steps) and is scored
by greedy exact match on 400 held-out pairs in the same phrasing.

    python benchmarks/finetune_quality.py --suite arithmetic    # work dir runs/ft-arith; base cached there
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
LR = {"full": 2e-3, "lora": 1e-2, "dora": 1e-2, "qlora": 1e-2}  # an adapter needs a higher lr than full
# arithmetic suite: at 1e-2 LoRA's loss stayed at 1.3-1.9 (0.5% exact match); 3e-3 converges
ARITH_LR = {"full": 2e-3, "lora": 3e-3, "dora": 3e-3, "qlora": 3e-3}


def pretrain(work: Path, steps: int, threads: int) -> Path:
    """The base model (cached in WORK/base): a 3.2M-parameter character model pretrained on prose and drills."""
    base = work / "base"
    if (base / "config.json").exists():
        return base
    from lmstack.data.instruct_tasks import pretraining_lines
    from lmstack.schema import load_config
    from lmstack.train.config import PretrainConfig
    from lmstack.train.recipes.pretrain import run

    data = work / "pretrain-data"
    if not (data / "train" / "index.json").exists():
        drills = work / "drills.txt"  # task prompts without answers, copying and counting (never an answer)
        drills.write_text("\n".join(pretraining_lines(40_000, 0)) + "\n")
        sources = [DATA / "tinyshakespeare" / "input.txt", DATA / "gutenberg_nltk" / "austen-emma.txt", drills]
        subprocess.run([sys.executable, "-m", "lmstack", "data", "prepare", "--input", *map(str, sources),
                        "--train-tokenizer", "char", "--no-clean", "--no-dedup", "--split", "tail",
                        "--val-fraction", "0.02", "--output", str(data)], check=True)
    cfg = load_config(PretrainConfig, None, [
        f"--out_dir={work / 'pretrain'}", f"--data.path={data}", "--model.hidden_size=256", "--model.num_layers=4",
        "--model.num_heads=8", "--model.num_kv_heads=8", "--model.intermediate_size=680",
        "--model.tie_word_embeddings=true", "--model.max_seq_len=256", "--optim.lr=3e-3", "--optim.betas=[0.9, 0.99]",
        "--schedule.warmup_steps=30", "--schedule.min_lr=3e-4", f"--train.steps={steps}", "--train.checkpoint_every=100", "--train.batch_size=16",
        "--train.seq_len=128", "--train.eval_every=100", "--train.eval_windows=64", f"--train.threads={threads}",
        "--train.progress=false", "--train.log_every=10"])
    result = run(cfg)
    result.checkpoint.rename(base)
    return base


def arithmetic_pairs() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(usable, held out): the 8,100 two-digit pairs split once by a seeded shuffle, 20% held out."""
    import random

    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(0).shuffle(pairs)
    return pairs[len(pairs) // 5:], pairs[:len(pairs) // 5]


def instruction(a: int, b: int) -> str:
    return f"What is {a} plus {b}?"


def pretrain_arithmetic(work: Path, steps: int, threads: int) -> Path:
    """The arithmetic base (cached in WORK/base): plain equations of the usable pairs (each pair 100 times, in a
    fresh order each pass) mixed with tinyshakespeare, about 85% equations by characters (at 56%, 1,000 steps
    reached only 11-15% on held-out pairs)."""
    import random

    base = work / "base"
    if (base / "config.json").exists():
        return base
    from lmstack.schema import load_config
    from lmstack.train.config import PretrainConfig
    from lmstack.train.recipes.pretrain import run

    data = work / "pretrain-data"
    if not (data / "train" / "index.json").exists():
        usable, _ = arithmetic_pairs()
        rng, lines = random.Random(1), []
        for _ in range(100):
            rng.shuffle(usable)
            lines += [f"{a}+{b}={a + b}" for a, b in usable]
        equations = work / "equations.txt"
        equations.write_text("\n".join(lines) + "\n")
        sources = [DATA / "tinyshakespeare" / "input.txt", equations]
        subprocess.run([sys.executable, "-m", "lmstack", "data", "prepare", "--input", *map(str, sources),
                        "--train-tokenizer", "char", "--no-clean", "--no-dedup", "--split", "tail",
                        "--val-fraction", "0.02", "--output", str(data)], check=True)
    cfg = load_config(PretrainConfig, None, [
        f"--out_dir={work / 'pretrain'}", f"--data.path={data}", "--model.hidden_size=128", "--model.num_layers=3",
        "--model.num_heads=4", "--model.num_kv_heads=4", "--model.intermediate_size=344",
        "--model.tie_word_embeddings=true", "--model.max_seq_len=128", "--optim.lr=3e-3", "--optim.betas=[0.9, 0.99]",
        "--schedule.warmup_steps=30", "--schedule.min_lr=3e-4", f"--train.steps={steps}", "--train.checkpoint_every=400",
        "--train.batch_size=32", "--train.seq_len=64", "--train.eval_every=0", f"--train.threads={threads}",
        "--train.progress=false", "--train.log_every=50"])
    started = time.perf_counter()
    result = run(cfg)
    (work / "pretrain-minutes.txt").write_text(f"{(time.perf_counter() - started) / 60:.2f}\n")
    result.checkpoint.rename(base)
    return base


def arithmetic_probe(base: Path, n: int = 400) -> dict:
    """The base's greedy exact match on held-out plain equations "a+b=" (the skill the base brings)."""
    import torch

    import lmstack
    from lmstack.generate.api import generate
    from lmstack.tokenizer import Tokenizer

    torch.set_num_threads(1)
    model, tokenizer = lmstack.load_model(str(base)).eval(), Tokenizer.load(base)
    _, held = arithmetic_pairs()
    prompts = [f"{a}+{b}=" for a, b in held[:n]]
    texts = generate(model, tokenizer, prompts, max_new_tokens=5).texts
    hits = [text.split("\n")[0].strip() == str(a + b) for text, (a, b) in zip(texts, held[:n])]
    minutes = base.parent / "pretrain-minutes.txt"
    return {"benchmark": "finetune_quality", "suite": "arithmetic", "base": str(base),
            "parameters": sum(p.numel() for p in model.parameters()),
            "pretrain_minutes": float(minutes.read_text()) if minutes.exists() else None,
            "plain_accuracy": round(sum(hits) / len(hits), 4), "heldout_problems": len(hits),
            "examples": [[prompts[i], texts[i]] for i in range(3)]}


def copy_probe(base: Path, n: int = 100) -> dict:
    """Can the base copy from its context? Greedy continuations of held-out copy drills (seed 99, which
    pretraining never saw) and counts: exact match of the repeated word / digits / next two numbers."""
    import re

    import torch

    import lmstack
    from lmstack.data.instruct_tasks import pretraining_lines
    from lmstack.generate.api import generate
    from lmstack.tokenizer import Tokenizer

    torch.set_num_threads(1)
    model, tokenizer = lmstack.load_model(str(base)).eval(), Tokenizer.load(base)
    lines = [line for i, line in enumerate(pretraining_lines(4 * n, 99)) if i % 4]  # the three drills
    prompts, answers = [], []
    for line in lines:
        if line.startswith("Counting: "):
            numbers = line.removesuffix(".").split()[1:]
            prompts.append("Counting: " + " ".join(numbers[:2]) + " ")
            answers.append(f"{int(numbers[1]) + 1} {int(numbers[1]) + 2}")
        else:
            cut = re.search(r"(: '|again, )", line).end()
            prompts.append(line[:cut])
            answers.append(line[cut:].rstrip(".'"))
    texts = generate(model, tokenizer, prompts, max_new_tokens=12).texts
    hits = [text.startswith(answer) for text, answer in zip(texts, answers)]
    kinds = ("word", "digits", "count")
    return {"benchmark": "finetune_quality", "base": str(base), "parameters": sum(p.numel() for p in model.parameters()),
            "copy_probe": {k: round(sum(hits[i::3]) / len(hits[i::3]), 3) for i, k in enumerate(kinds)},
            "examples": [[prompts[i], texts[i]] for i in range(3)]}


def arithmetic_train_file(work: Path) -> Path:
    """WORK/sft-train.jsonl: every usable pair, phrased as an instruction ("What is 47 plus 38?" -> "85")."""
    usable, _ = arithmetic_pairs()
    train_file = Path(work) / "sft-train.jsonl"
    train_file.write_text("".join(json.dumps({"prompt": instruction(a, b), "completion": str(a + b)}) + "\n"
                                  for a, b in usable))
    return train_file


def arithmetic_problems(n: int) -> list[dict]:
    """The first `n` held-out pairs as instruction problems (prompt, completion)."""
    _, held = arithmetic_pairs()
    return [{"prompt": instruction(a, b), "completion": str(a + b)} for a, b in held[:n]]


def finetune_args(method: str, base: str, out: Path, data_args: list[str], lr: float, steps: int, batch_size: int,
                  seq_len: int, threads: int) -> list[str]:
    """`lmstack finetune` options of one quality run (ChatML, no weight decay, LoRA-family r=16 on all linears)."""
    return [f"--model={base}", f"--method={method}", f"--out_dir={out}", *data_args, "--data.chat_template=chatml",
            f"--optim.lr={lr}", "--optim.weight_decay=0.0", "--schedule.warmup_steps=20", f"--train.steps={steps}",
            f"--train.batch_size={batch_size}", f"--train.seq_len={seq_len}", "--train.eval_every=0",
            "--train.progress=false", f"--train.threads={threads}",
            "--lora.r=16", "--lora.lora_alpha=32", "--lora.target_modules=all-linear"]


def chat_answers(model, tokenizer, problems: list[dict]) -> list[str]:
    """Greedy answers to the problems' prompts in ChatML, 100 prompts at a time, each stopping at <|im_end|>."""
    from lmstack.generate.api import generate

    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}], add_generation_prompt=True)
               for p in problems]
    end = [tokenizer.token_to_id("<|im_end|>")]
    texts = []
    for i in range(0, len(prompts), 100):  # batched greedy generation, 100 prompts at a time
        texts += generate(model, tokenizer, prompts[i:i + 100], max_new_tokens=12, eos_token_ids=end,
                          add_special_tokens=False).texts  # the chat template wrote every special token
    return texts


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark (VmHWM), MiB."""
    peak = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmHWM")))
    return round(peak / 1024, 1)


def finetune_worker(method: str, base: str, work: str, steps: int, n_train: int, n_eval: int, seq_len: int,
                    batch_size: int, lr: float | None, threads: int, suite: str = "tasks") -> None:
    """Run one method and evaluate it; prints one JSON line (this process's peak memory included)."""
    import torch

    from lmstack.adapters import unload
    from lmstack.data.instruct_tasks import KINDS, exact_match, generate_tasks
    from lmstack.schema import load_config
    from lmstack.tokenizer import Tokenizer
    from lmstack.train.recipes.finetune import FinetuneConfig, build_engine

    torch.set_num_threads(threads)
    lr = lr or (ARITH_LR if suite == "arithmetic" else LR)[method]
    out = Path(work) / method
    if suite == "arithmetic":
        data_args = [f"--data.train={arithmetic_train_file(Path(work))}"]
    else:
        data_args = ["--data.train=builtin:instruct-tasks", f"--data.max_samples={n_train}"]
    cfg = load_config(FinetuneConfig, None, finetune_args(method, base, out, data_args, lr, steps, batch_size,
                                                          seq_len, threads))
    started, cpu_started = time.perf_counter(), time.process_time()
    engine = build_engine(cfg)
    result = engine.fit()
    minutes = (time.perf_counter() - started) / 60
    cpu_minutes = (time.process_time() - cpu_started) / 60  # what the run cost, whatever else shares the machine
    tokenizer = Tokenizer.load(out / "tokenizer")
    model = engine.base_model.eval()
    if method != "full":
        model = unload(model)  # the trained adapter folded into (a dequantized copy of) the base it trained on
    if suite == "arithmetic":
        problems = arithmetic_problems(n_eval)
    else:
        train_prompts = {r["prompt"] for r in generate_tasks(n_train, 0)}
        problems = generate_tasks(n_eval, 12345, exclude=train_prompts)
    correct, by_kind = 0, {}
    for i, (problem, text) in enumerate(zip(problems, chat_answers(model, tokenizer, problems))):
        kind = "add" if suite == "arithmetic" else KINDS[i % len(KINDS)]  # generate_tasks: kinds in turn
        ok = exact_match(text, problem["completion"])
        correct += ok
        hits, total = by_kind.get(kind, (0, 0))
        by_kind[kind] = (hits + ok, total + 1)
    report = json.loads((out / "data_report.json").read_text())
    print(json.dumps({"benchmark": "finetune_quality", "suite": suite, "method": method, "lr": lr, "accuracy": round(correct / len(problems), 4),
                      "accuracy_by_kind": {k: round(h / t, 3) for k, (h, t) in by_kind.items()},
                      "heldout_problems": len(problems), "minutes": round(minutes, 2), "cpu_minutes": round(cpu_minutes, 2),
                      "peak_mem_mib": peak_rss_mib(), "final_train_loss": round(result.final_loss, 4),
                      "steps": steps, "epochs": report["epochs"], "trainable_params": report["trainable_parameters"],
                      "threads": torch.get_num_threads()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["tasks", "arithmetic"], default="tasks",
                        help="tasks: builtin:instruct-tasks on a prose base; arithmetic: two-digit addition (above)")
    parser.add_argument("--work", type=Path, help="default: runs/ft-quality (tasks), runs/ft-arith (arithmetic)")
    parser.add_argument("--base", type=Path, help="a base model directory (default: pretrain one, cached)")
    parser.add_argument("--methods", nargs="+", default=["full", "lora", "dora", "qlora"])
    parser.add_argument("--pretrain-steps", type=int, help="default: 400 (tasks), 2400 (arithmetic)")
    parser.add_argument("--sft-steps", type=int, help="default: 150 (tasks), 600 (arithmetic: 150 reached 16%%)")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-eval", type=int, default=400)
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per packed row")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per step")
    parser.add_argument("--lr", type=float, help="learning rate (default: per method, LR / ARITH_LR above)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (under load, more threads per process ran slower, not faster)")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "BASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    arithmetic = args.suite == "arithmetic"
    args.work = args.work or ROOT / "runs" / ("ft-arith" if arithmetic else "ft-quality")
    args.sft_steps = args.sft_steps or (600 if arithmetic else 150)
    if args.worker:
        finetune_worker(args.worker[0], args.worker[1], str(args.work), args.sft_steps, args.n_train, args.n_eval,
                        args.seq_len, args.batch_size, args.lr, args.threads, args.suite)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if arithmetic:
        base = args.base or pretrain_arithmetic(args.work, args.pretrain_steps or 2400, args.threads)
        print(json.dumps(arithmetic_probe(base)), flush=True)
    else:
        base = args.base or pretrain(args.work, args.pretrain_steps or 400, args.threads)
        print(json.dumps(copy_probe(base)), flush=True)
    for method in args.methods:
        subprocess.run([sys.executable, __file__, "--worker", method, str(base), "--work", str(args.work),
                        "--sft-steps", str(args.sft_steps), "--n-train", str(args.n_train), "--n-eval",
                        str(args.n_eval), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
                        "--threads", str(args.threads), "--suite", args.suite,
                        *(["--lr", str(args.lr)] if args.lr else [])],
                       check=True)


if __name__ == "__main__":
    main()
