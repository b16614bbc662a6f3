"""`lmstack info`: parameters, memory at each precision, training memory and FLOPs per token of a preset or checkpoint."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

from lmstack.cli.args import integer
from lmstack.config import PRESETS, ModelConfig, preset
from lmstack.errors import CheckpointError
from lmstack.interop.hf import read_config
from lmstack.model.cost import model_cost

# A source checkout's recipe configs (the repository's configs/), listed when present; never required.
RECIPES_DIR = Path(__file__).resolve().parents[2] / "configs"


def _number(n: float) -> str:
    """Three significant digits, never in exponent notation."""
    return f"{n:.0f}" if abs(n) >= 99.5 else f"{n:.1f}" if abs(n) >= 9.995 else f"{n:.2f}"


def _bytes(n: float) -> str:
    """Memory in binary units: 1 KiB = 1024 B (what allocators and `free -h` count)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1023.5 or unit == "TiB":  # 1023.6 KiB prints as 1.00 MiB, not 1024 KiB
            return f"{n:.0f} B" if unit == "B" else f"{_number(n)} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _si(n: float, unit: str) -> str:
    """A count in SI units, 1 k = 1000: '2.47 GFLOP'."""
    for prefix in ("", "k", "M", "G", "T", "P"):
        if abs(n) < 999.5 or prefix == "P":
            return f"{n:.0f} {unit}" if not prefix else f"{_number(n)} {prefix}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _parameters(n: int) -> str:
    """A parameter count as model names write it: 125K, 12.6M, 1.24B."""
    for suffix in ("", "K", "M", "B"):
        if n < 999.5 or suffix == "B":
            return f"{n:.0f}" if not suffix else f"{_number(n)}{suffix}"
        n /= 1000
    raise AssertionError("unreachable")


def _resolve(name: str) -> ModelConfig:
    """A model directory or a preset; an argument that looks like a path is never reported as a preset."""
    path = Path(name).expanduser()
    if path.is_dir():
        return read_config(path)
    if path.exists():
        raise CheckpointError(f"{name}: not a directory (a model directory holds config.json and the weights)")
    if os.sep in name or "/" in name or name.startswith((".", "~")):
        raise CheckpointError(f"{name}: no such directory")
    return preset(name)


def _presets() -> list[dict[str, Any]]:
    """One row per preset, with the other names of the same preset (gpt2 = gpt2-124m)."""
    rows: dict[int, dict[str, Any]] = {}
    for name, fields in PRESETS.items():
        if id(fields) in rows:
            rows[id(fields)]["aliases"].append(name)
            continue
        config = preset(name)
        rows[id(fields)] = {"name": name, "aliases": [], "family": config.family,
                            "parameters": model_cost(config).parameters}
    return list(rows.values())


def _recipes() -> list[dict[str, str]]:
    """configs/*.yaml, each with the first clause of its leading comment."""
    if not RECIPES_DIR.is_dir():
        return []
    recipes = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        comment = " ".join(line.lstrip("#").strip() for line in itertools.takewhile(lambda x: x.startswith("#"), lines))
        about = re.sub(r"\s*\([^)]*\)", "", comment).split(". ")[0].split(": ")[0]  # the headline, asides dropped
        recipes.append({"path": str(path), "about": about if len(about) <= 100 else about[:97] + "..."})
    return recipes


def _list(as_json: bool) -> int:
    presets, recipes = _presets(), _recipes()
    if as_json:
        print(json.dumps({"presets": presets, "recipes": recipes}))
        return 0
    print("presets (details: lmstack info NAME; in a config: `preset: NAME` under model:)")
    for row in presets:
        also = f"  (= {', '.join(row['aliases'])})" if row["aliases"] else ""
        print(f"  {row['name']:<14} {row['family']:<8} {_parameters(row['parameters']):>6} parameters{also}")
    if recipes:
        print(f"recipes in {RECIPES_DIR} (lmstack pretrain --config PATH)")
        for recipe in recipes:
            print(f"  {Path(recipe['path']).name:<24} {recipe['about']}")
    else:
        print("recipes: none here (the example configs/ ship with a source checkout of lmstack)")
    return 0


def _quantized_size(directory: str) -> dict | None:
    """Method, bytes and bytes per parameter of a directory `lmstack quantize` wrote; None otherwise."""
    hf = json.loads((Path(directory).expanduser() / "config.json").read_text(encoding="utf-8"))
    if not isinstance(hf.get("quantization_config"), dict):
        return None
    from lmstack.interop.hf import load_model
    from lmstack.quant.apply import model_nbytes

    nbytes, params = model_nbytes(load_model(Path(directory).expanduser()))
    return {"method": hf["quantization_config"].get("method"), "bytes": nbytes, "bytes_per_parameter": nbytes / params}


def main(argv: list[str]) -> int:
    """Parameter count, memory (fp32/bf16/int8/int4), AdamW training memory and FLOPs/token of a preset or checkpoint."""
    parser = argparse.ArgumentParser(prog="lmstack info", description=main.__doc__)
    parser.add_argument("model", nargs="?", help=f"a model directory or a preset: {', '.join(sorted(PRESETS))}")
    parser.add_argument("--list", action="store_true",
                        help="list the presets (name, family, parameters) and the recipe configs, then exit")
    parser.add_argument("--context", type=integer, default=None, help="tokens of context for the FLOPs figure")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.list:
        return _list(args.json)
    if args.model is None:
        parser.error("give a model directory or a preset name (--list shows the presets)")
    config = _resolve(args.model)
    cost = model_cost(config, args.context)
    quantized = _quantized_size(args.model) if Path(args.model).expanduser().is_dir() else None
    if args.json:
        print(json.dumps({"model": args.model, "config": config.to_dict(), **cost.__dict__,
                          **({"quantized": quantized} if quantized else {})}))
        return 0
    context = args.context or config.max_seq_len
    print(f"model            {args.model} ({config.family}: {config.num_layers} layers, width {config.hidden_size}, "
          f"{config.num_heads} heads / {config.num_kv_heads} kv heads, vocab {config.vocab_size})")
    print(f"parameters       {cost.parameters:,} ({cost.non_embedding_parameters:,} without embeddings)")
    for precision, nbytes in cost.weights_bytes.items():
        print(f"weights {precision:<8} {_bytes(nbytes)}")
    if quantized:
        print(f"quantized        {quantized['method']}: {_bytes(quantized['bytes'])} as stored, "
              f"{quantized['bytes_per_parameter']:.3f} bytes/parameter (scales and zero points included)")
    print(f"train (AdamW)    {_bytes(cost.adamw_training_bytes)} for fp32 weights, grads and moments, "
          f"+ ~{_bytes(cost.activation_bytes_per_token)} activations per token in a batch")
    print(f"FLOPs / token    forward {_si(cost.forward_flops_per_token, 'FLOP')}, "
          f"training {_si(cost.training_flops_per_token, 'FLOP')} (6N + attention at context {context})")
    return 0
