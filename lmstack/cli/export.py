"""`lmstack export gguf`: write a model directory as a GGUF file for llama.cpp (f32, f16, q8_0, q4_0)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmstack.errors import ConfigError
from lmstack.interop.hf import load_model
from lmstack.quant.gguf import TYPES, export_gguf, gguf_bytes_per_parameter


def main(argv: list[str]) -> int:
    """Export a model to another format: `lmstack export gguf --model DIR --type q8_0 --out FILE.gguf`."""
    parser = argparse.ArgumentParser(prog="lmstack export", description=main.__doc__)
    parser.add_argument("format", choices=["gguf"], help="the output format")
    parser.add_argument("--model", required=True,
                        help="a full-precision Llama-family model directory with its tokenizer")
    parser.add_argument("--type", default="q8_0", choices=TYPES, help="tensor type [q8_0]")
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    args = parser.parse_args(argv)
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConfigError("GGUF export needs the gguf package: pip install 'lmstack[gguf]' "
                          "(or pip install gguf)") from None
    model = load_model(args.model).eval()
    counts = export_gguf(model, args.model, args.out, args.type)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {size / 2**20:.2f} MiB, {gguf_bytes_per_parameter(args.out):.3f} bytes/parameter; "
          f"tensors {', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}")
    return 0
