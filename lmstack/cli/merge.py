"""`lmstack merge`: fold an adapter into its base model and write a plain Hugging Face model directory.

    lmstack merge --model BASE --adapter DIR --out OUT [--dtype fp32|bf16|fp16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lmstack.errors import CheckpointError, ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str]) -> int:
    """Merge a LoRA/DoRA adapter into its base: --model BASE --adapter DIR --out OUT (a plain HF directory)."""
    from lmstack.adapters import has_adapters, unload
    from lmstack.adapters.method_format import adapter_kind
    from lmstack.interop.hf import load_model, save_model
    from lmstack.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(prog="lmstack merge", description=main.__doc__)
    parser.add_argument("--model", type=Path, required=True, help="the base model directory")
    parser.add_argument("--adapter", type=Path, required=True, help="the adapter directory (peft format)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the merged model")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="dtype of the written weights; the merge itself is always done in fp32 (default fp32)")
    args = parser.parse_args(argv)
    for flag, path in (("--model", args.model), ("--adapter", args.adapter)):
        if not path.is_dir():
            raise CheckpointError(f"{flag} {path}: no such directory")
    if args.out.resolve() in (args.model.resolve(), args.adapter.resolve()):
        raise ConfigError(f"--out {args.out} would overwrite an input; choose another directory")
    model = unload(load_model(args.model, dtype=torch.float32, adapter=args.adapter))
    if has_adapters(model):  # prompt / prefix tuning and bottleneck adapters add computation, not weight deltas
        raise ConfigError(f"--adapter {args.adapter}: a {adapter_kind(model)} adapter cannot be folded into the "
                          "weights; use it as it is (lmstack generate / chat --adapter, or peft)")
    source = args.adapter if (args.adapter / "tokenizer.json").is_file() else args.model
    extra = Tokenizer.load(source).files() if (source / "tokenizer.json").is_file() else {}
    save_model(model, args.out, dtype=DTYPES[args.dtype], extra_files=extra)
    print(f"lmstack merge: wrote {args.out} ({args.dtype}, vocab {model.config.vocab_size})")
    return 0
