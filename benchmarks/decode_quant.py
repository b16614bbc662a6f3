"""Weight-only int8 / int4 decode against lmstack's own compiled fp32, same model, same run, batch 1.

Model: benchmarks/decode.py's 27M llama (vocab 8192, width 512, 8 layers, 8/4 heads, SwiGLU 1376, tied).
int8: RTN symmetric per output channel (`_weight_int8pack_mm`); int4: RTN asymmetric in groups of 32
(1376 = 43 x 32; `_weight_int4pack_mm_for_cpu`); the tied head / embedding stays fp32 in all three.
Each side decodes 64 new tokens after a 32-token prompt with the decode step compiled (on the CPU the
weights are frozen into the graph, lmstack/generate/compiled.py); best of --repeats after one warm-up
call that compiles. Reports decode tokens/s, prefill ms, the ratios to fp32, the CPU model and its
vector extensions, and the machine's load average (the shared 2-core machine's figures swing with it).

Prints one JSON line. Its keys map onto benchmarks/decode.py's as: "int8_ratio_vs_fp32",
"int4_ratio_vs_fp32" (decode tokens/s over compiled fp32's, batch 1), and "int8" / "int4" entries
shaped like decode.py's "compiled" entry.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

import lmstack
from lmstack.config import ModelConfig
from lmstack.quant.apply import QuantConfig, quantize_model
from lmstack.quant.linear import KERNEL_DTYPE

CONFIG = dict(vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1376,
              max_seq_len=1024, tie_word_embeddings=True)
PROMPT, NEW = 32, 64


def cpu_description() -> dict:
    """The CPU model and the vector extensions that decide which kernels run (detected, never assumed)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    return {"cpu": model, "cpu_flags": [f for f in wanted if f in flags],
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def run(model: lmstack.Transformer, ids: torch.Tensor, repeats: int) -> dict[str, float]:
    go = lambda: lmstack.generate(model, None, ids, max_new_tokens=NEW, ignore_eos=True, compile=True)
    start = time.perf_counter()
    go()
    first_call_s = time.perf_counter() - start
    best = max((go().stats for _ in range(repeats)), key=lambda s: s.decode_tokens_per_s)
    return {"decode_tok_s": round(best.decode_tokens_per_s, 1), "prefill_ms": round(best.prefill_s * 1e3, 2),
            "first_call_s": round(first_call_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp32 = lmstack.Transformer(ModelConfig(**CONFIG)).eval()
    models = {"fp32": fp32}
    for name, cfg in {"int8": QuantConfig("rtn", 8, None, symmetric=True), "int4": QuantConfig("rtn", 4, 32)}.items():
        models[name] = copy.deepcopy(fp32)
        report = quantize_model(models[name], cfg)
        models[name].bytes_per_parameter = report.bytes_per_parameter
    ids = torch.randint(0, CONFIG["vocab_size"], (1, PROMPT))
    result: dict[str, object] = {"benchmark": "decode_quant", "params": fp32.num_parameters(), "batch": 1,
                                 "prompt_tokens": PROMPT, "new_tokens": NEW, "threads": torch.get_num_threads(),
                                 "kernel_activation_dtype": str(KERNEL_DTYPE).removeprefix("torch."),
                                 **cpu_description(), "load_average_1m": round(os.getloadavg()[0], 1)}
    for name, model in models.items():
        result[name] = run(model, ids, args.repeats)
        if name != "fp32":
            result[name]["bytes_per_parameter"] = round(model.bytes_per_parameter, 3)
            fp = result["fp32"]
            result[f"{name}_ratio_vs_fp32"] = round(result[name]["decode_tok_s"] / fp["decode_tok_s"], 2)
            result[f"{name}_prefill_ratio_vs_fp32"] = round(fp["prefill_ms"] / result[name]["prefill_ms"], 2)
    result["load_average_1m_after"] = round(os.getloadavg()[0], 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
