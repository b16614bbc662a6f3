"""Encode throughput (MB/s) of lmstack's Tokenizer against transformers' AutoTokenizer on the same directory.

Both drive the same Rust `tokenizers` backend, so this measures what each wrapper adds on top: the
figure to watch is the ratio (>= 1 means lmstack's wrapper costs nothing extra). Also reports the
training time of the byte-level BPE tokenizer both are loaded from. Text: the Gutenberg books in
../shared/data/gutenberg_nltk (or --data DIR), split into paragraphs as a data pipeline would batch them.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lmstack.tokenizer import load_tokenizer, train_tokenizer
from timing import best_seconds  # benchmarks/timing.py (the script's own directory is on sys.path)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gutenberg_nltk"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1024, help="paragraphs per encode_batch call")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    books = sorted(args.data.glob("*.txt"))
    if not books:
        raise SystemExit(f"{args.data}: no .txt files")
    text = "".join(p.read_bytes().decode("utf-8", errors="replace") for p in books)
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    megabytes = sum(len(p.encode("utf-8")) for p in paragraphs) / 1e6
    batches = [paragraphs[i:i + args.batch] for i in range(0, len(paragraphs), args.batch)]

    start = time.perf_counter()
    trained = train_tokenizer(books, "bpe", args.vocab_size)
    train_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as directory:
        trained.save(directory)
        ours = load_tokenizer(directory)
        theirs = AutoTokenizer.from_pretrained(directory)
        # identical output first: a speed comparison of different results would mean nothing
        assert ours.encode_batch(batches[0]) == theirs(batches[0], add_special_tokens=False)["input_ids"]
        lmstack_s = best_seconds(lambda: [ours.encode_batch(b) for b in batches], args.repeats)
        peer_s = best_seconds(lambda: [theirs(b, add_special_tokens=False)["input_ids"] for b in batches],
                              args.repeats)
    print(json.dumps({
        "benchmark": "tokenizer_encode", "kind": "bpe", "vocab_size": args.vocab_size, "megabytes": round(megabytes, 2),
        "paragraphs": len(paragraphs), "lmstack_mb_per_s": round(megabytes / lmstack_s, 2),
        "transformers_mb_per_s": round(megabytes / peer_s, 2), "ratio": round(peer_s / lmstack_s, 3),
        "bpe_train_seconds": round(train_seconds, 2), "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
