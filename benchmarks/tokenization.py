"""Tokenisation throughput: lmstack's pipeline (worker processes writing shards) vs a single-process
loop over `tokenizers`' encode_batch, on the same documents (Gutenberg paragraphs by default).

(Named tokenization.py, not tokenize.py: a script's directory comes first on sys.path, and a
benchmarks/tokenize.py would then shadow the standard library's `tokenize` for every script in
benchmarks/ — torch imports it through inspect/linecache.)

Prints one JSON line. Both sides tokenise the identical documents with the identical tokenizer
(a byte-level BPE trained once on the data, outside the timing) and must produce the same number
of tokens. lmstack's figure covers the whole tokenise stage: reading the spooled text, encoding,
appending eos and writing the shard files. The peer only encodes in memory (its text is already
loaded), using the Rust thread pool on every core. Both start each repeat with a freshly loaded
tokenizer (a cold BPE cache), as a real run does. Best of --repeats runs each.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import tokenizers
import torch

from lmstack.data import pipeline
from lmstack.data.pipeline import PrepareConfig
from lmstack.schema import from_dict

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "gutenberg_nltk"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a directory of .txt files")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: train bpe:8192 on --data)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-mb", type=float, default=0.5, help="text per shard (many shards keep workers busy)")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data}: no such directory (pass --data)")

    with tempfile.TemporaryDirectory(prefix="lmstack-bench-tok-") as tmp_name:
        tmp = Path(tmp_name)
        cfg = from_dict(PrepareConfig, {
            "inputs": [str(args.data)], "text_unit": "paragraph", "clean": False,
            "dedup": {"exact": False, "near": False}, "val_fraction": 0.0,
            "shard_chars": int(args.shard_mb * 1e6), "workers": args.workers, "output": str(tmp / "out"),
            **({"tokenizer": str(args.tokenizer)} if args.tokenizer else {"train_tokenizer": "bpe:8192"})})
        work = tmp / "work"
        work.mkdir()
        stage1 = pipeline.run_stage1(cfg, work)  # spool the paragraphs once (not timed)
        tokenizer = pipeline.prepare_tokenizer(cfg, work, stage1)  # trained here when not given (not timed)
        texts = list(pipeline.spool_texts(work / "spool" / "train", stage1.chunks["train"]))
        megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6

        ours, ours_tokens = float("inf"), 0
        for _ in range(args.repeats):
            shutil.rmtree(work / "shards", ignore_errors=True)
            t0 = time.perf_counter()
            metas = pipeline.run_tokenize(cfg, work, stage1, tokenizer)
            ours = min(ours, time.perf_counter() - t0)
            ours_tokens = sum(m["num_tokens"] - m["num_documents"] for m in metas["train"])  # without eos

        peer, peer_tokens = float("inf"), 0
        batch = 1024
        for _ in range(args.repeats):
            # a fresh tokenizer each repeat: its BPE word cache starts cold, as in each pipeline worker
            backend = tokenizers.Tokenizer.from_file(str(work / "tokenizer" / "tokenizer.json"))
            t0 = time.perf_counter()
            count = 0
            for i in range(0, len(texts), batch):
                count += sum(len(e.ids) for e in backend.encode_batch(texts[i:i + batch], add_special_tokens=False))
            peer = min(peer, time.perf_counter() - t0)
            peer_tokens = count
    if ours_tokens != peer_tokens:
        sys.exit(f"token counts differ: lmstack {ours_tokens}, tokenizers {peer_tokens}")
    print(json.dumps({
        "benchmark": "tokenize", "data": str(args.data), "documents": len(texts), "megabytes": round(megabytes, 3),
        "tokens": ours_tokens,
        "lmstack_mb_per_s": round(megabytes / ours, 3), "lmstack_workers": args.workers,
        "peer": "tokenizers.Tokenizer.encode_batch, 1 process (Rust threads on all cores), no file output",
        "peer_mb_per_s": round(megabytes / peer, 3), "ratio": round(peer / ours, 3),
        "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
