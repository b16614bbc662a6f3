"""Fine-tuning throughput and memory: lmstack against peft on transformers, one JSON line per method (issue 11).

The train benchmark's model and batch (vocab 8192, width 512, 8 layers, 8 heads / 4 KV heads, SwiGLU 1376,
tied embeddings; B=8 x T=256 random tokens, fp32), one optimizer step per timed step (forward, loss,
backward, AdamW step, zero_grad), for each method:

    full            every weight trains                     peer: LlamaForCausalLM + torch AdamW
    lora            r=16, alpha=32, all-linear, dropout 0.05  peer: peft.get_peft_model(LoraConfig(same))
    dora            the same with use_dora                  peer: peft with use_dora=True
    qlora           LoRA over an NF4 base (double quant)    peer: transformers' bitsandbytes 4-bit (nf4, double
                                                                  quant, fp32 compute) + peft LoRA
    full_adamw8bit  full with the 8-bit AdamW               peer: LlamaForCausalLM + bitsandbytes AdamW8bit

Each side runs in its own process (peak memory is per side: the growth of the peak resident set over the
resident set before the model was built, reset after the warm-up steps); the sides take steps in turn so
that the shared machine's drift hits them alike, and each side's figure is its best step. lmstack runs
eagerly by default (--compile for torch.compile, which the peer does not get).

    python benchmarks/finetune.py                       # all methods, 2 timed steps each (short: a shared machine)
    python benchmarks/finetune.py --methods lora --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import (
    BATCH,
    FFN,
    HEADS,
    KV_HEADS,
    LAYERS,
    SEQ,
    VOCAB,
    WIDTH,
    batch,
    current_rss_bytes,
    peak_rss_bytes,
    reset_peak_rss,
)

METHODS = ("full", "lora", "dora", "qlora", "full_adamw8bit")
LR, BETAS, EPS = 1e-4, (0.9, 0.95), 1e-8
R, ALPHA, DROPOUT = 16, 32, 0.05


def cpu_flags() -> dict:
    """The CPU model and its vector extensions (detected, never assumed)."""
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"cpu": model, "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))}


# ---------------------------------------------------------------------------------------------- the sides
def lmstack_step(method: str) -> tuple[Callable[[], float], dict]:
    from lmstack.adapters import LoraConfig, apply_lora
    from lmstack.adapters.qlora import quantize_base, weight_bytes
    from lmstack.config import ModelConfig
    from lmstack.model import Transformer
    from lmstack.train.config import OptimConfig
    from lmstack.train.device import keep_freed_cpu_memory
    from lmstack.train.engine import scale_gradients
    from lmstack.train.objectives import causal_lm_loss
    from lmstack.train.optim import build_optimizer
    from lmstack.train.optim8bit import build_adamw8bit

    keep_freed_cpu_memory()
    config = ModelConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_layers=LAYERS, num_heads=HEADS,
                         num_kv_heads=KV_HEADS, intermediate_size=FFN, tie_word_embeddings=True, max_seq_len=SEQ)
    torch.manual_seed(0)
    model = Transformer(config)
    if method == "qlora":
        quantize_base(model)
    if method in ("lora", "dora", "qlora"):
        apply_lora(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear",
                                     use_dora=method == "dora"))
    model.train()
    if os.environ.get("LMSTACK_BENCH_COMPILE") == "1":
        model.compile()
    optim_cfg = OptimConfig(lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    optimizer = (build_adamw8bit if method == "full_adamw8bit" else build_optimizer)(model, optim_cfg)
    inputs, targets = batch()
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:  # as Engine.compute_gradients: backward of the summed loss, then divide by the count
        loss = causal_lm_loss(model, inputs, targets)
        loss.total.backward()
        count = int(loss.count)
        scale_gradients(params, 1.0 / count)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.total.item() / count

    return step, {"trainable": sum(p.numel() for p in params), "weight_bytes": weight_bytes(model)}


def peer_step(method: str) -> tuple[Callable[[], float], dict]:
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, intermediate_size=FFN, tie_word_embeddings=True,
                         max_position_embeddings=SEQ, rms_norm_eps=1e-5, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if method == "qlora":  # transformers quantizes while loading: save, then load in 4 bits
        import tempfile
        directory = tempfile.mkdtemp(prefix="lmstack-bench-peer-")
        model.save_pretrained(directory)
        del model
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
        model = LlamaForCausalLM.from_pretrained(directory, quantization_config=quant, device_map="cpu")
    if method in ("lora", "dora", "qlora"):
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                           target_modules="all-linear", use_dora=method == "dora",
                                                           task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "full_adamw8bit":
        import bitsandbytes as bnb
        optimizer = bnb.optim.AdamW8bit(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    inputs, _ = batch()

    def step() -> float:
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    weight = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return step, {"trainable": sum(p.numel() for p in params), "weight_bytes": weight}


def worker(side: str, method: str) -> None:
    """Serve one side over stdin/stdout: "step" -> {"seconds", "loss"}; "done" -> {"peak_bytes"}."""
    warnings.simplefilter("ignore")
    if side == "peer":
        import peft  # noqa: F401  (imports belong to start-up, not to the measured memory)
        import transformers.models.llama.modeling_llama  # noqa: F401
        if method in ("qlora", "full_adamw8bit"):
            import bitsandbytes  # noqa: F401
    else:
        import lmstack.adapters
        import lmstack.train.optim  # noqa: F401
    reset_peak_rss()
    rss_before = current_rss_bytes()
    step, info = peer_step(method) if side == "peer" else lmstack_step(method)
    print(json.dumps({"threads": torch.get_num_threads(), **info}), flush=True)
    for command in sys.stdin:
        command = command.strip()
        if command == "reset_peak":
            reply = {"peak_reset": reset_peak_rss()}
        elif command == "step":
            start = time.perf_counter()
            loss = step()
            reply = {"seconds": time.perf_counter() - start, "loss": loss}
        else:
            reply = {"peak_bytes": peak_rss_bytes() - rss_before}
        print(json.dumps(reply), flush=True)
        if command == "done":
            return


class Worker:
    def __init__(self, side: str, method: str, compile_model: bool):
        env = {**os.environ, "LMSTACK_BENCH_COMPILE": "1" if compile_model else "0"}
        self.name = f"{side}-{method}"
        self.process = subprocess.Popen([sys.executable, __file__, "--worker", side, method], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker {self.name} exited (code {self.process.wait()}); see stderr")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()


def run_method(method: str, steps: int, warmup: int, compile_model: bool) -> dict:
    workers = {side: Worker(side, method, compile_model) for side in ("lmstack", "peer")}
    try:
        for _ in range(warmup):
            for w in workers.values():
                w.ask("step")
        for w in workers.values():
            w.ask("reset_peak")
        times: dict[str, list[float]] = {side: [] for side in workers}
        losses: dict[str, float] = {}
        for _ in range(steps):
            for side, w in workers.items():
                reply = w.ask("step")
                times[side].append(reply["seconds"])
                losses[side] = reply["loss"]
        peaks = {side: w.ask("done")["peak_bytes"] for side, w in workers.items()}
    finally:
        for w in workers.values():
            if w.process.poll() is None:
                w.process.kill()
            w.process.wait()
    tokens = BATCH * SEQ
    ours, theirs = tokens / min(times["lmstack"]), tokens / min(times["peer"])
    mib = 2**20
    line = {
        "benchmark": "finetune", "method": method,
        "lmstack_tokens_per_s": round(ours, 1), "peer_tokens_per_s": round(theirs, 1), "ratio": round(ours / theirs, 3),
        "lmstack_peak_mem_mib": round(peaks["lmstack"] / mib, 1), "peer_peak_mem_mib": round(peaks["peer"] / mib, 1),
        "mem_ratio": round(peaks["lmstack"] / peaks["peer"], 3),
        "lmstack_weight_mib": round(workers["lmstack"].hello["weight_bytes"] / mib, 1),
        "peer_weight_mib": round(workers["peer"].hello["weight_bytes"] / mib, 1),
        "trainable_params": workers["lmstack"].hello["trainable"],
        "peer_trainable_params": workers["peer"].hello["trainable"],
        "losses": {side: round(loss, 4) for side, loss in losses.items()},
        "batch": [BATCH, SEQ], "dtype": "fp32", "threads": workers["lmstack"].hello["threads"], "steps": steps,
        "compile": compile_model, **cpu_flags(),
    }
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side (the best one counts)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side")
    parser.add_argument("--compile", action="store_true", help="torch.compile lmstack's model (not the peer's)")
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    weights: dict[str, float] = {}
    for method in args.methods:
        line = run_method(method, args.steps, args.warmup, args.compile)
        weights[method] = line["lmstack_weight_mib"]
        if method == "qlora" and "lora" in weights:
            line["weight_mem_ratio_vs_lora"] = round(line["lmstack_weight_mib"] / weights["lora"], 3)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
