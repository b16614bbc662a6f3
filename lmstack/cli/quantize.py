"""`lmstack quantize`: quantize a model directory (RTN, NF4/FP4, GPTQ, AWQ, SmoothQuant, dynamic, QAT, mixed bits)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from lmstack.cli.args import integer, number
from lmstack.errors import ConfigError
from lmstack.interop.hf import load_model
from lmstack.quant.apply import METHODS, NEEDS_CALIBRATION, QuantConfig, quantize_model
from lmstack.quant.calibration import BUILTIN, calibration_tokens, mean_nll
from lmstack.quant.checkpoint import save_quantized
from lmstack.tokenizer import Tokenizer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmstack quantize", description=main.__doc__)
    p.add_argument("--model", required=True, help="a model directory (with its tokenizer)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--out", required=True, help="the quantized model directory to write")
    p.add_argument("--bits", type=integer, default=4, help="rtn / gptq / awq / qat: 8, 4 or 3 [4]")
    p.add_argument("--group-size", type=integer, default=128, help="columns per scale; 0 = one per output channel [128]")
    p.add_argument("--symmetric", action="store_true", help="absmax scales, fixed zero point (int8 kernel needs it)")
    p.add_argument("--block-size", type=integer, default=64, help="nf4 / fp4 block [64]")
    p.add_argument("--no-double-quant", action="store_true", help="nf4 / fp4: keep the block scales in fp32")
    p.add_argument("--calib", nargs="+", default=None,
                   help=f"calibration text: files, directories, globs or {BUILTIN} [{BUILTIN}]")
    p.add_argument("--calib-samples", type=integer, default=64, help="calibration windows [64]")
    p.add_argument("--calib-seq-len", type=integer, default=256, help="tokens per window [256; capped at the context]")
    p.add_argument("--damp", type=number, default=0.01, help="gptq damping, fraction of mean diag(H) [0.01]")
    p.add_argument("--act-order", action="store_true", help="gptq: columns by decreasing Hessian diagonal")
    p.add_argument("--alpha", type=number, default=0.5, help="smoothquant migration strength [0.5]")
    p.add_argument("--no-clip", action="store_true", help="awq: skip the clipping search")
    p.add_argument("--include-head", action="store_true", help="also quantize lm_head (a tied head gets its own quantized copy; the embedding stays full precision)")
    p.add_argument("--target-bits", type=number, default=None,
                   help="mixed precision (rtn / gptq): scan each layer at 3/4/8 bits and choose widths for this "
                        "average (e.g. 3.5)")
    p.add_argument("--qat-steps", type=integer, default=200, help="qat: training steps on the calibration text [200]")
    p.add_argument("--qat-lr", type=number, default=1e-4, help="qat: peak learning rate [1e-4]")
    p.add_argument("--eval", nargs="+", default=None,
                   help="held-out text to report perplexity on, before and after (files / directories)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    return p


def _train_qat(model, tokens: torch.Tensor, cfg: QuantConfig, steps: int, lr: float) -> float:
    """Fake-quantize the block linears and train on the calibration windows with the engine; -> seconds."""
    from lmstack.quant.qat import prepare_qat
    from lmstack.train.config import OptimConfig, ScheduleConfig, TrainConfig
    from lmstack.train.engine import Engine
    from lmstack.train.objectives import causal_lm_loss

    prepare_qat(model, cfg.bits, cfg.group_size, cfg.symmetric)
    batch_size = min(8, tokens.shape[0])

    class Windows:  # a pure function of the step, as the engine's resume wants
        tokens_per_step = batch_size * (tokens.shape[1] - 1)

        def micro_batches(self, step: int):
            rows = torch.arange(step * batch_size, (step + 1) * batch_size) % tokens.shape[0]
            return [(tokens[rows, :-1], tokens[rows, 1:])]

    engine = Engine(model, lambda m, batch: causal_lm_loss(m, *batch), Windows(),
                    TrainConfig(steps=steps, batch_size=batch_size, seq_len=tokens.shape[1] - 1, eval_every=0,
                                progress=False, device="cpu"),
                    OptimConfig(lr=lr, weight_decay=0.0), ScheduleConfig(warmup_steps=max(1, steps // 10)))
    return engine.fit().wall_s


def main(argv: list[str]) -> int:
    """Quantize a model directory and write the quantized directory (perplexity before / after with --eval)."""
    args = _parser().parse_args(argv)
    cfg = QuantConfig(args.method, args.bits, args.group_size or None, args.symmetric, args.block_size,
                      not args.no_double_quant, args.damp, args.act_order, args.alpha, awq_clip=not args.no_clip,
                      include_head=args.include_head)
    cfg.check()
    if args.target_bits is not None and args.method not in ("rtn", "gptq"):
        raise ConfigError(f"--target-bits chooses widths for rtn or gptq, not {args.method}")
    model = load_model(args.model).eval()
    seq_len = min(args.calib_seq_len, model.config.max_seq_len)
    needs_text = args.method in NEEDS_CALIBRATION or args.method == "qat" or args.target_bits is not None
    # rtn / nf4 / dynamic read no text: a directory without a tokenizer (a training checkpoint) quantizes too
    tokenizer = Tokenizer.load(args.model) if needs_text or args.eval else None
    calib = (calibration_tokens(tokenizer, args.calib, args.calib_samples, seq_len, model.config.eos_token_id)
             if needs_text else None)
    held_out = (calibration_tokens(tokenizer, args.eval, 64, seq_len, model.config.eos_token_id)
                if args.eval else None)
    report: dict = {"model": args.model, "method": args.method, "out": args.out}
    if held_out is not None:
        report["perplexity_before"] = math.exp(mean_nll(model, held_out))

    if args.target_bits is not None:
        from lmstack.quant.mixed import choose_bits, format_table, sensitivity_scan
        rows = choose_bits(sensitivity_scan(model, calib, group_size=cfg.group_size), args.target_bits)
        cfg.bits_per_layer = {r.name: r.bits for r in rows}
        print(format_table(rows))
    if args.method == "qat":
        report["qat_train_s"] = _train_qat(model, calib, cfg, args.qat_steps, args.qat_lr)
    with torch.no_grad():
        result = quantize_model(model, cfg, calib)
    save_quantized(model, args.out, args.model)
    if held_out is not None:
        report["perplexity_after"] = math.exp(mean_nll(model, held_out))
    report |= {"layers": result.layers, "bytes_per_parameter": round(result.bytes_per_parameter, 4),
               "quantized_bytes_per_parameter": round(result.quantized_bytes_per_parameter, 4),
               "model_bytes": result.model_bytes, "seconds": round(result.seconds, 2)}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"lmstack quantize: {args.method} on {result.layers} linears in {result.seconds:.1f} s; "
              f"{result.model_bytes / 2**20:.2f} MiB, {result.bytes_per_parameter:.3f} bytes/parameter overall, "
              f"{result.quantized_bytes_per_parameter:.3f} in the quantized layers (scales and zero points included)")
        if held_out is not None:
            print(f"perplexity on the held-out text: {report['perplexity_before']:.3f} -> "
                  f"{report['perplexity_after']:.3f}")
        print(f"wrote {Path(args.out)}: lmstack chat --model {args.out}")
    return 0
