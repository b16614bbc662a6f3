"""`lmstack embed`: sentence embeddings from an encoder directory (BERT / MiniLM / sentence-transformers).

    lmstack embed --model DIR --text "A man is eating." --text "A girl plays."        # JSON lines to stdout
    lmstack embed --model DIR --input texts.txt --output vectors.jsonl                # one text per line
    lmstack embed --model DIR --input records.jsonl --text-field body                 # JSONL: a field per record

Each output line is {"id"?, "text", "embedding": [d floats]}, pooled and normalised as the directory's
sentence-transformers config says (lmstack.embed).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmstack.atomic import atomic_file
from lmstack.errors import CheckpointError, ConfigError, DataError, InputFileError


def _read_inputs(path: str, fmt: str, field: str) -> Iterator[dict[str, Any]]:
    """Records {"text", "id"?} from a text file (a line per text) or JSONL (`field` per record); '-' = stdin."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InputFileError(f"{path}: cannot read ({e.strerror})") from None
    jsonl = fmt == "jsonl" or (fmt == "auto" and path.endswith((".jsonl", ".json")))
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not jsonl:
            yield {"text": line}
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DataError(f"{path}:{number}: expected a JSON object with a string {field!r} (--text-field)")
        yield {**({"id": record["id"]} if "id" in record else {}), "text": record[field]}


def main(argv: list[str]) -> int:
    """Sentence embeddings from an encoder directory: --text ... or --input FILE (lines or JSONL) -> JSON lines."""
    parser = argparse.ArgumentParser(prog="lmstack embed", description=main.__doc__)
    parser.add_argument("--model", type=Path, required=True, help="encoder directory (with tokenizer.json)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to embed (repeatable)")
    source.add_argument("--input", help="a file of texts: one per line, or JSONL ('-' = stdin)")
    parser.add_argument("--format", choices=["auto", "text", "jsonl"], default="auto",
                        help="--input format (auto: JSONL for .jsonl / .json)")
    parser.add_argument("--text-field", default="text", help="the JSONL key holding the text (default text)")
    parser.add_argument("--output", type=Path, help="write the JSON lines here (atomically) instead of stdout")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.model.is_dir():
        raise CheckpointError(f"{args.model}: no such model directory")

    from lmstack.interop.hf import load_model
    from lmstack.model.embedding import embed
    from lmstack.tokenizer import Tokenizer

    records = ([{"text": t} for t in args.text] if args.text is not None
               else list(_read_inputs(args.input, args.format, args.text_field)))
    model = load_model(args.model, device=args.device)
    vectors = embed(model, Tokenizer.load(args.model), [r["text"] for r in records], batch_size=args.batch_size)
    lines = [json.dumps({**r, "embedding": [round(x, 7) for x in v]}, ensure_ascii=False)
             for r, v in zip(records, vectors.tolist())]
    if args.output is not None:
        with atomic_file(args.output) as f:
            f.write("".join(line + "\n" for line in lines))
    else:
        sys.stdout.write("".join(line + "\n" for line in lines))
    return 0
