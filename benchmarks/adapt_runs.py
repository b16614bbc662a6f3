"""What benchmarks/peft_methods.py, forgetting.py and distill.py share (not a benchmark itself).

- `base_model(work)`: the base, a character-level Llama-style model (4 layers, width 128, 0.8M parameters)
  pretrained here with `lmstack pretrain` on tinyshakespeare + Jane Austen's Emma (../shared/data), cached in
  WORK/base with its token shards in WORK/pretrain-data.
- `finetune_run(...)`: one `lmstack finetune` run on `builtin:instruct-tasks` in its own process (so its peak
  memory is its own; rows of 224 tokens for every method, so 20 virtual tokens still fit the 256-token context),
  measured: trainable parameters, tokens/s (median of the logged steps), peak RSS, the task
  (exact match of greedy answers on held-out problems, and the held-out assistant-token loss), and forgetting
  (the perplexity of the pretraining validation windows, base vs fine-tuned, over the base vocabulary).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def cpu_info() -> dict:
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))}


def base_model(work: Path, steps: int = 300, threads: int = 1) -> tuple[Path, Path]:
    """(base model directory, its token shards), pretrained once and cached under `work`."""
    work = work.resolve()  # the runs go on in processes with another working directory
    base, data = work / "base", work / "pretrain-data"
    if not (data / "train" / "index.json").exists():
        sources = [DATA / "tinyshakespeare" / "input.txt", DATA / "gutenberg_nltk" / "austen-emma.txt"]
        subprocess.run([sys.executable, "-m", "lmstack", "data", "prepare", "--input", *map(str, sources),
                        "--train-tokenizer", "char", "--no-clean", "--no-dedup", "--split", "tail",
                        "--val-fraction", "0.02", "--output", str(data)], check=True, cwd=ROOT)
    if (base / "config.json").exists():
        return base, data
    from lmstack.schema import load_config
    from lmstack.train.config import PretrainConfig
    from lmstack.train.recipes.pretrain import run

    cfg = load_config(PretrainConfig, None, [
        f"--out_dir={work / 'pretrain'}", f"--data.path={data}", "--model.hidden_size=128", "--model.num_layers=4",
        "--model.num_heads=4", "--model.num_kv_heads=4", "--model.intermediate_size=344",
        "--model.tie_word_embeddings=true", "--model.max_seq_len=256", "--optim.lr=2e-3", "--optim.betas=[0.9, 0.99]",
        "--schedule.warmup_steps=50", "--schedule.min_lr=2e-4", f"--train.steps={steps}", "--train.batch_size=8",
        "--train.seq_len=256", "--train.eval_every=0", "--train.eval_windows=32", f"--train.threads={threads}",
        "--train.progress=false"])
    started = time.perf_counter()
    result = run(cfg)
    result.checkpoint.rename(base)
    (work / "base-pretrain.json").write_text(json.dumps({"steps": steps, "val_loss": result.val_loss,
                                                         "minutes": (time.perf_counter() - started) / 60}))
    return base, data


def pretrain_val_ppl(model, data: Path, windows: int = 32, seq_len: int = 224) -> float:
    """exp(mean CE) over the pretraining validation split's first `windows` windows, logits over the base vocabulary
    only (new chat-marker rows left out, so the number compares with the base's)."""
    import torch
    import torch.nn.functional as F

    from lmstack.data.loader import TokenStream

    stream = TokenStream(data / "val")
    vocab = stream.info.vocab_size
    count = min(windows, (len(stream) - 1) // seq_len)
    inputs, targets = stream.windows([i * seq_len for i in range(count)], seq_len)
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, count, 8):
            logits = model(inputs[i:i + 8])[..., :vocab].float()
            total += F.cross_entropy(logits.flatten(0, 1), targets[i:i + 8].flatten(), reduction="sum").item()
            n += targets[i:i + 8].numel()
    return math.exp(total / n)


def worker(spec: dict) -> dict:
    """One fine-tuning run described by `spec` (method, base, data, out, steps, lr, overrides, n_eval, threads)."""
    import torch

    from lmstack.data.instruct_tasks import exact_match, generate_tasks
    from lmstack.generate import generate
    from lmstack.interop.hf import load_model
    from lmstack.schema import load_config
    from lmstack.tokenizer import Tokenizer
    from lmstack.train.recipes.finetune import FinetuneConfig, build_engine

    torch.set_num_threads(spec["threads"])
    out, data = Path(spec["out"]), Path(spec["data"])
    if out.exists():  # a benchmark run starts afresh
        shutil.rmtree(out)
    before = pretrain_val_ppl(load_model(spec["base"]), data)
    args = [f"--model={spec['base']}", f"--method={spec['method']}", f"--out_dir={out}",
            "--data.train=builtin:instruct-tasks", f"--data.max_samples={spec['n_train']}",
            "--data.chat_template=chatml", f"--optim.lr={spec['lr']}", "--optim.weight_decay=0.0",
            "--schedule.warmup_steps=20", f"--train.steps={spec['steps']}", "--train.batch_size=8",
            "--train.seq_len=224", "--train.eval_every=0", "--train.progress=false",
            f"--train.threads={spec['threads']}", "--train.checkpoint_every=0",
            "--lora.r=16", "--lora.lora_alpha=32", *spec.get("overrides", [])]
    cfg = load_config(FinetuneConfig, None, args)
    started = time.perf_counter()
    engine = build_engine(cfg)
    result = engine.fit()
    minutes = (time.perf_counter() - started) / 60
    model = engine.base_model.eval()
    after = pretrain_val_ppl(model, data)
    tokenizer = Tokenizer.load(out / "tokenizer")
    train_prompts = {r["prompt"] for r in generate_tasks(spec["n_train"], 0)}
    problems = generate_tasks(spec["n_eval"], 12345, exclude=train_prompts)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}], add_generation_prompt=True)
               for p in problems]
    end = [tokenizer.token_to_id("<|im_end|>")]
    correct, task_loss, task_tokens = 0, 0.0, 0
    for i in range(0, len(prompts), 16):
        texts = generate(model, tokenizer, prompts[i:i + 16], max_new_tokens=16, eos_token_ids=end).texts
        correct += sum(exact_match(t, p["completion"]) for t, p in zip(texts, problems[i:i + 16]))
    with torch.no_grad():  # held-out assistant-token loss: informative before exact match moves
        for prompt, problem in zip(prompts, problems):
            p_ids = tokenizer.encode(prompt)
            a_ids = tokenizer.encode(problem["completion"]) + end
            ids = torch.tensor([p_ids + a_ids])
            logits = model(ids[:, :-1])[0, len(p_ids) - 1:].float()
            task_loss += torch.nn.functional.cross_entropy(logits, ids[0, len(p_ids):], reduction="sum").item()
            task_tokens += len(a_ids)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if r.get("kind") == "train" and r.get("tokens_per_s")]
    peak = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmHWM")))
    report = json.loads((out / "data_report.json").read_text())
    return {"trainable_params": report["trainable_parameters"], "total_params": report["total_parameters"],
            "tokens_per_s": round(statistics.median(speeds[len(speeds) // 4:]), 1) if speeds else None,
            "peak_mem_mib": round(peak / 1024, 1), "task_exact_match": round(correct / len(problems), 4),
            "task_val_loss": round(task_loss / task_tokens, 4), "final_train_loss": round(result.final_loss, 4),
            "pretrain_val_ppl_before": round(before, 4), "pretrain_val_ppl_after": round(after, 4),
            "pretrain_ppl_increase": round(after - before, 4), "minutes": round(minutes, 2), "steps": spec["steps"],
            "epochs": report["epochs"], "heldout_problems": len(problems), "threads": torch.get_num_threads(),
            **cpu_info()}


def finetune_run(spec: dict, worker: str = "adapt_runs") -> dict:
    """`worker(spec)` of the benchmarks module `worker` in a fresh process (its peak memory its own); its JSON result."""
    code = (f"import json, sys; from {worker} import worker; "
            "print('RESULT ' + json.dumps(worker(json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], cwd=Path(__file__).parent, check=False,
                          capture_output=True, text=True, env={**os.environ,
                                                                "PYTHONPATH": f"{ROOT}:{Path(__file__).parent}"})
    if done.returncode != 0:
        raise RuntimeError(f"{spec['method']} run failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])
