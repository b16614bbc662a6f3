"""Decode speed: lmstack.generate vs transformers' generate on the identical 27M-parameter llama, fp32, greedy.

Model: vocab 8192, width 512, 8 layers, 8 heads, 4 KV heads, SwiGLU 1376, tied embeddings (27.4M params).
Workload: 32-token random prompts, 64 new tokens (EOS ignored), batch 1 and 8. Each figure is the best of
--repeats runs, end-to-end tokens/s (prefill included, as the peer's is); lmstack also reports prefill
time and decode tokens/s separately, eager and with the decode step compiled (on CPU: weights frozen
into the graph, lmstack/generate/compiled.py), and the compiled side's first call (compilation included;
inductor's on-disk cache makes a second process faster). The batch-1 roofline
fraction is weight bytes x decode tokens/s over the copy bandwidth (bytes read + written per second
copying a 256 MiB buffer) measured in the same run. The CPU model and its vector flags are printed with it.

Weight-only int8 and int4 at batch 1 (issue 13), beside fp32 in the same run: the same model quantized by
lmstack.quant (int8: RTN symmetric per output channel, `_weight_int8pack_mm`; int4: RTN in groups of 32,
1376 = 43 x 32, `_weight_int4pack_mm_for_cpu`; the tied head quantized the same way as its own copy, since a
decode step reads all of it, while the embedding stays fp32: a lookup reads one row), decoded the way the
fp32 batch-1 figure was (compiled unless --no-compile; compiled, inductor lowers the int8 op to its own C++
weight-only-int8 GEMM, and the int4 op to its C++ weight-only-int4 GEMM where the CPU has AVX-512 and bf16,
"int4_compiled_kernel" saying which ran). fp32, int8 and int4 are timed interleaved (all compiled first, then
--repeats rounds of the three in turn, best of each; the fp32 figure of those rounds is "fp32_interleaved").
"int8_ratio_vs_fp32" / "int4_ratio_vs_fp32" are decode tokens/s over that fp32 figure,
"..._prefill_ratio_vs_fp32" prefill time fp32 over quantized (above 1: faster). --no-quant skips them; the 1-minute load average before and after is printed, since
the shared machine's figures swing with it.

Prints exactly one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import lmstack
from lmstack.config import ModelConfig
from lmstack.quant.apply import QuantConfig, quantize_model
from lmstack.quant.linear import INT4_TEMPLATE, KERNEL_DTYPE
from timing import best_seconds  # benchmarks/timing.py (the script's own directory is on sys.path)

CONFIG = dict(vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1376,
              max_seq_len=1024, tie_word_embeddings=True)
PROMPT, NEW = 32, 64


def machine() -> dict[str, object]:
    """The CPU this ran on: its model name and the vector extensions that matter for fp32/bf16 GEMMs (detected)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
    return {"cpu": model, "cpu_flags": [f for f in wanted if f in flags], "threads": torch.get_num_threads()}


def copy_bandwidth(repeats: int = 10) -> float:
    """Bytes moved per second (read + write) copying a buffer much larger than the last-level cache."""
    src = torch.rand(64 * 2**20)  # 256 MiB
    dst = torch.empty_like(src)
    seconds = best_seconds(lambda: dst.copy_(src), repeats, warmup=1)
    return 2 * src.numel() * src.element_size() / seconds


def lmstack_run(model: lmstack.Transformer, ids: torch.Tensor, compile: bool, repeats: int) -> dict[str, float]:
    """Best end-to-end tokens/s over `repeats`, with that run's prefill time and decode tokens/s, and the
    warm-up call's time (which includes compiling, when on)."""
    run = lambda: lmstack.generate(model, None, ids, max_new_tokens=NEW, ignore_eos=True, compile=compile)  # noqa: E731
    start = time.perf_counter()
    run()  # warm-up (and compilation)
    first_call_s = time.perf_counter() - start
    best = None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - start
        if best is None or seconds < best[0]:
            best = (seconds, out.stats)
    seconds, stats = best
    B = ids.shape[0]
    return {"tok_s": B * NEW / seconds, "prefill_ms": stats.prefill_s * 1e3, "decode_tok_s": stats.decode_tokens_per_s,
            "first_call_s": first_call_s}


def timed_run(model: lmstack.Transformer, ids: torch.Tensor, compile: bool) -> tuple[float, object]:
    """One generate call: (seconds, its GenerationStats)."""
    start = time.perf_counter()
    out = lmstack.generate(model, None, ids, max_new_tokens=NEW, ignore_eos=True, compile=compile)
    return time.perf_counter() - start, out.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled runs")
    parser.add_argument("--no-quant", action="store_true", help="skip the int8 / int4 batch-1 runs")
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    model = lmstack.Transformer(ModelConfig(**CONFIG)).eval()
    with tempfile.TemporaryDirectory() as directory:
        lmstack.save_model(model, directory)
        peer = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    weight_bytes = model.num_parameters() * 4  # tied: the head reads the embedding matrix once per token
    bandwidth = copy_bandwidth()
    result: dict[str, object] = {"benchmark": "decode", "params": model.num_parameters(), "dtype": "float32",
                                 "prompt_tokens": PROMPT, "new_tokens": NEW, **machine(),
                                 "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
                                 "load_average_1m": round(os.getloadavg()[0], 1)}
    prompts = {B: torch.randint(0, CONFIG["vocab_size"], (B, PROMPT)) for B in args.batches}
    # Every peer and eager figure first, every compiled one after: compiling leaves inductor's worker
    # processes behind, and a peer timed after them ran 7x slower at batch 8 (37 vs ~250 tokens/s).
    for B, ids in prompts.items():

        def peer_generate() -> None:
            with torch.no_grad():
                peer.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                              do_sample=False, pad_token_id=0)

        peer_tok_s = B * NEW / best_seconds(peer_generate, args.repeats, warmup=1)
        eager = lmstack_run(model, ids, False, args.repeats)
        shown = {k: round(v, 1) for k, v in eager.items() if k != "first_call_s"}  # eager compiles nothing
        result[f"batch{B}"] = {"peer_tok_s": round(peer_tok_s, 1), "eager": shown,
                               "eager_ratio": round(eager["tok_s"] / peer_tok_s, 2), "_best": eager}
    for B, ids in prompts.items():
        entry = result[f"batch{B}"]
        if not args.no_compile:
            compiled = lmstack_run(model, ids, True, args.repeats)
            entry["compiled"] = {k: round(v, 1) for k, v in compiled.items()}
            entry["compiled_ratio"] = round(compiled["tok_s"] / entry["peer_tok_s"], 2)
            entry["_best"] = max(entry["_best"], compiled, key=lambda r: r["tok_s"])
        best = entry.pop("_best")
        entry["ratio"] = round(best["tok_s"] / entry["peer_tok_s"], 2)
        if B == 1:
            entry["roofline_fraction"] = round(weight_bytes * best["decode_tok_s"] / bandwidth, 3)
    if not args.no_quant:
        quantized_runs(model, prompts.get(1, prompts[min(prompts)][:1]), not args.no_compile, args.repeats, result)
    result["load_average_1m_after"] = round(os.getloadavg()[0], 1)
    print(json.dumps(result))


def quantized_runs(fp32: lmstack.Transformer, ids: torch.Tensor, compile: bool, repeats: int,
                   result: dict[str, object]) -> None:
    """int8 and int4 weight-only decode at batch 1, each against fp32 decoded the same way, timed interleaved: every
    model warmed up (compiled) first, then `repeats` rounds of fp32, int8, int4 in turn, best of each, so that a
    change of load on a shared machine falls on all three alike (run one after another, the ratios moved by 1.5x
    with the load between runs)."""
    ids = ids[:1]
    result["quant_reference"] = "fp32 " + ("compiled" if compile else "eager") + ", batch 1, interleaved"
    result["kernel_activation_dtype"] = str(KERNEL_DTYPE).removeprefix("torch.")
    if compile:
        result["int4_compiled_kernel"] = "inductor C++ int4 template" if INT4_TEMPLATE else "aten op, opaque"
    models, sizes = {"fp32": fp32}, {}
    for name, cfg in {"int8": QuantConfig("rtn", 8, None, symmetric=True, include_head=True),
                      "int4": QuantConfig("rtn", 4, 32, include_head=True)}.items():
        models[name] = copy.deepcopy(fp32)
        sizes[name] = quantize_model(models[name], cfg).bytes_per_parameter
    first_call = {name: timed_run(model, ids, compile)[0] for name, model in models.items()}  # warm-up, compile
    runs: dict[str, dict[str, float]] = {}
    for _ in range(repeats):
        for name, model in models.items():
            seconds, stats = timed_run(model, ids, compile)
            if name not in runs or stats.decode_tokens_per_s > runs[name]["decode_tok_s"]:
                runs[name] = {"tok_s": NEW / seconds, "prefill_ms": stats.prefill_s * 1e3,
                              "decode_tok_s": stats.decode_tokens_per_s, "first_call_s": first_call[name]}
    reference = runs["fp32"]
    result["fp32_interleaved"] = {k: round(reference[k], 1) for k in ("decode_tok_s", "prefill_ms")}
    for name in ("int8", "int4"):
        measured = runs[name]
        result[name] = {**{k: round(v, 1) for k, v in measured.items()},
                        "bytes_per_parameter": round(sizes[name], 3)}
        result[f"{name}_ratio_vs_fp32"] = round(measured["decode_tok_s"] / reference["decode_tok_s"], 2)
        result[f"{name}_prefill_ratio_vs_fp32"] = round(reference["prefill_ms"] / measured["prefill_ms"], 2)


if __name__ == "__main__":
    main()
