"""Training throughput and memory: lmstack's training step against transformers' LlamaForCausalLM (issue 4).

Both sides train the same model (vocab 8192, width 512, 8 layers, 8 heads / 4 KV heads, SwiGLU 1376,
tied embeddings) on the same fp32 batch (B=8 x T=256 random tokens) with AdamW of the same
hyper-parameters and parameter groups (weight decay on matrices only), one full step each:
forward + loss + backward + optimizer step + zero_grad.

- lmstack: `Transformer` + `lmstack.train.objectives.causal_lm_loss` + `lmstack.train.optim.build_optimizer`
  (the functions the engine calls), compiled with `model.compile()` exactly as `train.compile: true`
  does in the engine (pass --no-compile for eager), with the engine's CPU malloc setting
  (`keep_freed_cpu_memory`). Compile time is reported, not counted in tokens/s.
- peer: `LlamaForCausalLM(..., attn_implementation="sdpa")` with its own loss (`labels=`) and
  `torch.optim.AdamW` in its default CPU implementation, as a transformers user would run it.

Each side (and lmstack with activation checkpointing) runs in its own worker process, so peak memory
is per side: the growth of the process's peak resident set (Linux VmHWM, reset after start-up and
compilation) over its resident set before the model was built: weights, gradients, AdamW moments and
activations at their high-water mark. The workers take steps in turn (A B C A B C ...) so that drift in
this shared machine's speed hits every side alike; each side's figure is its best step. Between
rounds the parent measures the fp32 GEMM peak (a 2048^3 matmul, best of all repeats), and each side's
fraction of it uses lmstack.model.cost.model_cost's training FLOPs per token (6N + attention at T=256).

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

VOCAB, WIDTH, LAYERS, HEADS, KV_HEADS, FFN = 8192, 512, 8, 8, 4, 1376
BATCH, SEQ = 8, 256
LR, BETAS, EPS, WEIGHT_DECAY = 3e-4, (0.9, 0.95), 1e-8, 0.1
SIDES = ("peer", "lmstack", "lmstack_checkpointing")


# ---------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    """A `VmRSS` / `VmHWM` figure of this process in KiB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return 1024 * kib if kib is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    return 1024 * kib if kib is not None else 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> bool:
    """Restart the VmHWM high-water mark at the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- the sides
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The same (inputs, targets) for every side: (B, T) int64 each, targets = inputs shifted left by one."""
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def lmstack_step(compile_model: bool, checkpointing: bool) -> Callable[[], float]:
    """lmstack's training step from the engine's own pieces; returns a function that runs one and gives the loss."""
    from lmstack.config import ModelConfig
    from lmstack.model import Transformer
    from lmstack.train.config import OptimConfig
    from lmstack.train.device import keep_freed_cpu_memory
    from lmstack.train.engine import scale_gradients
    from lmstack.train.objectives import causal_lm_loss
    from lmstack.train.optim import build_optimizer

    keep_freed_cpu_memory()  # as the engine does on the CPU

    config = ModelConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_layers=LAYERS, num_heads=HEADS,
                         num_kv_heads=KV_HEADS, intermediate_size=FFN, tie_word_embeddings=True, max_seq_len=SEQ)
    torch.manual_seed(0)
    model = Transformer(config)
    model.gradient_checkpointing = checkpointing
    model.train()
    if compile_model:
        model.compile()  # what Engine does for train.compile: true
    optimizer = build_optimizer(model, OptimConfig(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY))
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

    return step


def peer_step() -> Callable[[], float]:
    """transformers' LlamaForCausalLM with the identical config and torch.optim.AdamW, as its users train it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, intermediate_size=FFN, tie_word_embeddings=True,
                         max_position_embeddings=SEQ, rms_norm_eps=1e-5, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.train()
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in name]
    no_decay = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in name)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=BETAS, eps=EPS)
    inputs, _ = batch()

    def step() -> float:
        loss = model(input_ids=inputs, labels=inputs).loss  # HF shifts the labels itself
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def worker(side: str, compile_model: bool) -> None:
    """Serve one side over stdin/stdout: "step" -> {"seconds", "loss"}; "done" -> {"peak_bytes", ...}."""
    if side == "peer":
        import transformers.models.llama.modeling_llama  # noqa: F401  (imports belong to start-up, not to memory)
    else:
        import lmstack.train.optim  # noqa: F401
    reset_peak_rss()
    rss_before = current_rss_bytes()
    start = time.perf_counter()
    step = peer_step() if side == "peer" else lmstack_step(compile_model, checkpointing=side.endswith("checkpointing"))
    reply = {"threads": torch.get_num_threads(), "build_s": time.perf_counter() - start}
    print(json.dumps(reply), flush=True)
    for command in sys.stdin:
        command = command.strip()
        if command == "reset_peak":  # after warm-up (and compilation): measure steady-state training only
            reply = {"peak_reset": reset_peak_rss()}
        elif command == "step":
            start = time.perf_counter()
            loss = step()
            reply = {"seconds": time.perf_counter() - start, "loss": loss}
        elif command == "done":
            reply = {"peak_bytes": peak_rss_bytes() - rss_before}
        else:
            raise ValueError(f"unknown command {command!r}")
        print(json.dumps(reply), flush=True)
        if command == "done":
            return


class Worker:
    """The parent's handle on one side's process."""

    def __init__(self, side: str, compile_model: bool):
        args = [sys.executable, __file__, "--worker", side] + ([] if compile_model else ["--no-compile"])
        # A cold compile: an empty inductor cache (no graphs or C++ kernels from an earlier run), so compile_s
        # is what a user's first run pays.
        self.cache_dir = tempfile.TemporaryDirectory(prefix="lmstack-bench-inductor-")
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": self.cache_dir.name}
        self.side = side
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker {self.side!r} exited (code {self.process.wait()}); see stderr")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> dict:
        reply = self.ask("done")
        self.process.wait()
        self.cache_dir.cleanup()
        return reply


# ---------------------------------------------------------------------------------------------- the run
def gemm_seconds(size: int = 2048) -> float:
    """One fp32 (size x size) @ (size x size) matmul, timed."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    start = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side (the best one counts)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side (the first one compiles)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="run lmstack eagerly")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                        help="skip the activation-checkpointing side")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.compile)
        return

    from lmstack.config import ModelConfig
    from lmstack.model.cost import model_cost

    config = ModelConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_layers=LAYERS, num_heads=HEADS,
                         num_kv_heads=KV_HEADS, intermediate_size=FFN, tie_word_embeddings=True, max_seq_len=SEQ)
    flops_per_token = model_cost(config, context=SEQ).training_flops_per_token
    sides = SIDES if args.checkpointing else SIDES[:2]
    workers = {side: Worker(side, args.compile) for side in sides}
    try:
        first_step_s: dict[str, float] = {}
        for i in range(args.warmup):
            for side, w in workers.items():
                seconds = w.ask("step")["seconds"]
                first_step_s.setdefault(side, seconds)
        for w in workers.values():
            w.ask("reset_peak")
        times: dict[str, list[float]] = {side: [] for side in sides}
        losses: dict[str, float] = {}
        gemm = [gemm_seconds() for _ in range(4)]
        for _ in range(args.steps):
            for side, w in workers.items():
                reply = w.ask("step")
                times[side].append(reply["seconds"])
                losses[side] = reply["loss"]
            gemm += [gemm_seconds() for _ in range(4)]
        peaks = {side: w.close()["peak_bytes"] for side, w in workers.items()}
    finally:
        for w in workers.values():
            if w.process.poll() is None:
                w.process.kill()

    threads = {side: w.hello["threads"] for side, w in workers.items()}
    if len(set(threads.values())) != 1 or torch.get_num_threads() not in threads.values():
        raise RuntimeError(f"thread counts differ between processes: {threads}")
    tokens = BATCH * SEQ
    tokens_per_s = {side: tokens / min(t) for side, t in times.items()}
    gemm_peak = 2 * 2048**3 / min(gemm)
    mib = 2**20
    result = {
        "benchmark": "train", "batch": [BATCH, SEQ], "dtype": "fp32", "threads": torch.get_num_threads(),
        "lmstack_tokens_per_s": round(tokens_per_s["lmstack"], 1),
        "peer_tokens_per_s": round(tokens_per_s["peer"], 1),
        "ratio": round(tokens_per_s["lmstack"] / tokens_per_s["peer"], 3),
        "lmstack_peak_mem_mib": round(peaks["lmstack"] / mib, 1),
        "peer_peak_mem_mib": round(peaks["peer"] / mib, 1),
        "mem_ratio": round(peaks["lmstack"] / peaks["peer"], 3),
        "gemm_peak_gflops": round(gemm_peak / 1e9, 1),
        "training_flops_per_token": flops_per_token,
        "lmstack_peak_fraction": round(tokens_per_s["lmstack"] * flops_per_token / gemm_peak, 3),
        "peer_peak_fraction": round(tokens_per_s["peer"] * flops_per_token / gemm_peak, 3),
        "compile": args.compile,
        "lmstack_first_step_s": round(first_step_s["lmstack"], 1),  # includes torch.compile when on
        "compile_s": round(first_step_s["lmstack"] - min(times["lmstack"]), 1) if args.compile else 0.0,
        "losses": {side: round(loss, 4) for side, loss in losses.items()},
        "steps": args.steps, "timing": "best step of each side, sides interleaved step by step",
        "memory": "peak RSS growth over the pre-model RSS, own process per side, peak reset after warm-up",
    }
    if "lmstack_checkpointing" in times:
        result["checkpointing"] = {
            "tokens_per_s": round(tokens_per_s["lmstack_checkpointing"], 1),
            "peak_mem_mib": round(peaks["lmstack_checkpointing"] / mib, 1),
            "mem_saving_mib": round((peaks["lmstack"] - peaks["lmstack_checkpointing"]) / mib, 1),
            "mem_saving_fraction": round(1 - peaks["lmstack_checkpointing"] / peaks["lmstack"], 3),
            "speed_ratio_vs_no_checkpointing": round(tokens_per_s["lmstack_checkpointing"] / tokens_per_s["lmstack"], 3),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
