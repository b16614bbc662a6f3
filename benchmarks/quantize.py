"""Quantization quality: held-out perplexity, size and decode speed of every method on one trained model.

Usage: python benchmarks/quantize.py --model DIR --text FILE [--val-fraction 0.1]

The model is one pretrained here (README, section quantize: tinyshakespeare, character level). The text's
last --val-fraction is the held-out evaluation text (the model never trained on it); calibration windows
and QAT's training windows come from the rest. Methods: fp32, RTN int8 (symmetric per channel), RTN int4
g128, GPTQ int4 g128, AWQ int4 g128, NF4, NF4 + double quant, FP4 and symmetric RTN int4 g64 (QLoRA's
comparison), RTN int3 g128, GPTQ int3 g128, SmoothQuant
W8A8, dynamic W8A8, QAT int4 g128 (--qat-bits 4 3: also QAT int3 g128, against RTN int3) and a mixed-precision
choice (RTN, 3/4/8 bits for a 4.0-bit average).

Prints one JSON line per method (perplexity, its increase over fp32, bytes per parameter of the whole
model and of the quantized layers, eager batch-1 decode tokens/s), then one summary line with the
papers' claims checked on this model: "gptq4_vs_rtn4_increase_ratio" (GPTQ: <= 0.5), "nf4_beats_rtn4",
"qat_recovered_fraction" (QAT: >= 0.5 of RTN int4's increase recovered; "..._int3" at 3 bits).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch

import lmstack
from lmstack.quant.apply import QuantConfig, quantize_model
from lmstack.quant.calibration import mean_nll
from lmstack.quant.mixed import average_bits, choose_bits, sensitivity_scan
from lmstack.quant.qat import prepare_qat
from lmstack.tokenizer import Tokenizer

METHODS = {
    "rtn_int8": QuantConfig("rtn", 8, None, symmetric=True),
    "rtn_int4_g128": QuantConfig("rtn", 4, 128),
    "gptq_int4_g128": QuantConfig("gptq", 4, 128),
    "awq_int4_g128": QuantConfig("awq", 4, 128),
    "nf4": QuantConfig("nf4", double_quant=False),
    "nf4_double_quant": QuantConfig("nf4"),
    # what QLoRA compared NF4 with: FP4 and symmetric (absmax) int4, both in blocks of 64 as NF4's
    "fp4": QuantConfig("fp4", double_quant=False),
    "rtn_int4_g64_symmetric": QuantConfig("rtn", 4, 64, symmetric=True),
    "rtn_int3_g128": QuantConfig("rtn", 3, 128),
    "gptq_int3_g128": QuantConfig("gptq", 3, 128),
    "smoothquant_w8a8": QuantConfig("smoothquant"),
    "dynamic_w8a8": QuantConfig("dynamic"),
}


def windows(ids: torch.Tensor, seq_len: int, count: int | None = None) -> torch.Tensor:
    """Non-overlapping (n, seq_len) windows of a token stream, the first `count` (all by default)."""
    n = ids.numel() // seq_len
    out = ids[: n * seq_len].view(n, seq_len)
    return out if count is None else out[torch.linspace(0, n - 1, min(count, n)).long()]


def decode_tok_s(model, seq_len: int) -> float:
    prompt = torch.zeros(1, 8, dtype=torch.long)
    lmstack.generate(model, None, prompt, max_new_tokens=4, ignore_eos=True)  # warm-up
    out = lmstack.generate(model, None, prompt, max_new_tokens=min(48, seq_len - 8), ignore_eos=True)
    return out.stats.decode_tokens_per_s


def train_qat(model, train: torch.Tensor, bits: int, steps: int, lr: float) -> float:
    """QAT (int`bits` g128) through the engine on training windows (as `lmstack quantize --method qat` does)."""
    from lmstack.train.config import OptimConfig, ScheduleConfig, TrainConfig
    from lmstack.train.engine import Engine
    from lmstack.train.objectives import causal_lm_loss

    prepare_qat(model, bits, 128)
    batch = 8

    class Windows:
        tokens_per_step = batch * (train.shape[1] - 1)

        def micro_batches(self, step):
            rows = torch.arange(step * batch, (step + 1) * batch) % train.shape[0]
            return [(train[rows, :-1], train[rows, 1:])]

    engine = Engine(model, lambda m, b: causal_lm_loss(m, *b), Windows(),
                    TrainConfig(steps=steps, batch_size=batch, seq_len=train.shape[1] - 1, eval_every=0,
                                progress=False, device="cpu"),
                    OptimConfig(lr=lr, weight_decay=0.0), ScheduleConfig(warmup_steps=steps // 10))
    return engine.fit().wall_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True, help="the text file whose tail is held out")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--eval-windows", type=int, default=256)
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--qat-steps", type=int, default=150)
    parser.add_argument("--qat-lr", type=float, default=1e-4)
    parser.add_argument("--qat-bits", type=int, nargs="+", default=[4], help="QAT runs, each against RTN at its bits")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=None, help="run only these methods (and fp32)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = lmstack.load_model(args.model).eval()
    tok = Tokenizer.load(args.model)
    ids = torch.tensor(tok.encode(Path(args.text).read_text(encoding="utf-8")), dtype=torch.long)
    split = int(len(ids) * (1 - args.val_fraction))
    seq_len = base.config.max_seq_len
    held_out = windows(ids[split:], seq_len, args.eval_windows)
    train = windows(ids[:split], seq_len)
    calib = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))[: args.calib_windows]]
    common = {"model": args.model, "params": base.num_parameters(), "eval_tokens": held_out.numel(),
              "calib_tokens": calib.numel(), "threads": torch.get_num_threads()}

    fp_ppl = math.exp(mean_nll(base, held_out))
    results = {"fp32": {"perplexity": fp_ppl, "bytes_per_parameter": 4.0}}
    print(json.dumps({"benchmark": "quantize", "method": "fp32", "perplexity": round(fp_ppl, 4),
                      "bytes_per_parameter": 4.0, "decode_tok_s": round(decode_tok_s(base, seq_len), 1), **common}))

    def record(name: str, model, report, seconds: float, **extra) -> None:
        ppl = math.exp(mean_nll(model, held_out))
        results[name] = {"perplexity": ppl, "bytes_per_parameter": report.bytes_per_parameter}
        print(json.dumps({"benchmark": "quantize", "method": name, "perplexity": round(ppl, 4),
                          "increase": round(ppl - fp_ppl, 4),
                          "bytes_per_parameter": round(report.bytes_per_parameter, 4),
                          "quantized_bytes_per_parameter": round(report.quantized_bytes_per_parameter, 4),
                          "quantize_s": round(seconds, 1), "decode_tok_s": round(decode_tok_s(model, seq_len), 1),
                          "load_average_1m": round(os.getloadavg()[0], 1), **extra, **common}), flush=True)

    chosen = [m for m in METHODS if args.only is None or m in args.only]
    for name in chosen:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        report = quantize_model(model, copy.deepcopy(METHODS[name]), calib)
        record(name, model, report, time.perf_counter() - start)

    for bits in args.qat_bits:
        if args.only is not None and f"qat_int{bits}_g128" not in args.only:
            continue
        model = copy.deepcopy(base).train()
        seconds = train_qat(model, train, bits, args.qat_steps, args.qat_lr)
        model.eval()
        report = quantize_model(model, QuantConfig("qat", bits, 128), calib)
        record(f"qat_int{bits}_g128", model, report, seconds, qat_steps=args.qat_steps, qat_lr=args.qat_lr)

    if args.only is None or "mixed_rtn_4.0" in args.only:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        rows = choose_bits(sensitivity_scan(model, calib[:16], (3, 4, 8), 128), 4.0)
        cfg = QuantConfig("rtn", 4, 128, bits_per_layer={r.name: r.bits for r in rows})
        report = quantize_model(model, cfg, calib)
        record("mixed_rtn_4.0", model, report, time.perf_counter() - start, average_bits=round(average_bits(rows), 3),
               bits={r.name.removeprefix("model.layers."): r.bits for r in rows})

    def increase(name: str) -> float | None:
        return results[name]["perplexity"] - fp_ppl if name in results else None

    summary = {"benchmark": "quantize_summary", "fp32_perplexity": round(fp_ppl, 4)}
    if increase("gptq_int4_g128") is not None and increase("rtn_int4_g128"):
        summary["gptq4_vs_rtn4_increase_ratio"] = round(increase("gptq_int4_g128") / increase("rtn_int4_g128"), 3)
    if increase("gptq_int3_g128") is not None and increase("rtn_int3_g128"):
        summary["gptq3_vs_rtn3_increase_ratio"] = round(increase("gptq_int3_g128") / increase("rtn_int3_g128"), 3)
    if increase("nf4") is not None and increase("rtn_int4_g128") is not None:
        summary["nf4_beats_rtn4"] = increase("nf4") < increase("rtn_int4_g128")
    for peer in ("fp4", "rtn_int4_g64_symmetric"):
        if increase("nf4") is not None and increase(peer) is not None:
            summary[f"nf4_beats_{peer}"] = increase("nf4") < increase(peer)
    for bits in args.qat_bits:  # the share of RTN's increase at the same bits that QAT recovers (paper: >= 0.5)
        if increase(f"qat_int{bits}_g128") is not None and increase(f"rtn_int{bits}_g128"):
            key = "qat_recovered_fraction" + ("" if bits == 4 else f"_int{bits}")
            summary[key] = round(1 - increase(f"qat_int{bits}_g128") / increase(f"rtn_int{bits}_g128"), 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
