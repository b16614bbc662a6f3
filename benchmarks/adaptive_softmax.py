"""Adaptive softmax against the full softmax on the same model and data: training speed and loss (issue 17).

A byte-level BPE tokenizer with a large vocabulary (default 32768) is trained on the Gutenberg books in
../shared/data (or --books DIR); token ids are renumbered by frequency in the training split (the
adaptive softmax's clusters are frequency bands: torch's AdaptiveLogSoftmaxWithLoss assumes the same).
Two models that differ only in the head train on identical batches, one step each in turn so that this
shared machine's load hits both alike:

- full: the Transformer's linear head with the fused head + cross-entropy (lmstack.model.head_loss);
- adaptive: `head_cutoffs` (default 2000,10000; div_value 4): lmstack.model.adaptive_softmax.

Prints one JSON line per model (training tokens/s as the median step, validation loss after the same
steps, exact log-likelihood for both) and one per head in a head-only timing (forward + backward of the
loss on (N, d) hidden states with targets drawn from the data's token frequencies), where torch's own
AdaptiveLogSoftmaxWithLoss and the unfused F.linear + F.cross_entropy are measured too. Ratios are
against the full softmax of the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import machine  # noqa: E402
from benchmarks.timing import best_seconds  # noqa: E402
from lmstack import Transformer, preset  # noqa: E402
from lmstack.model.adaptive_softmax import AdaptiveSoftmaxHead  # noqa: E402
from lmstack.model.head_loss import linear_cross_entropy  # noqa: E402
from lmstack.tokenizer import train_tokenizer  # noqa: E402
from lmstack.train.objectives import causal_lm_loss  # noqa: E402

DEFAULT_BOOKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "gutenberg_nltk"


def corpus(books: Path, vocab: int, max_chars: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train ids, val ids, counts) with ids renumbered so that 0 is the most frequent training token.
    max_chars > 0 reads only the start of each book, that many characters in all."""
    paths = sorted(books.glob("*.txt"))
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
    if max_chars:
        texts = [t[:max_chars // len(paths)] for t in texts]
    tok = train_tokenizer(iter(texts), "bpe", vocab_size=vocab)
    ids = np.concatenate([np.array(tok.encode(t) + [tok.eos_token_id]) for t in texts])
    split = int(len(ids) * 0.95)
    counts = np.bincount(ids[:split], minlength=tok.vocab_size)
    rank = np.empty(tok.vocab_size, dtype=np.int64)
    rank[np.argsort(-counts, kind="stable")] = np.arange(tok.vocab_size)
    return rank[ids[:split]], rank[ids[split:]], np.sort(counts)[::-1]


def windows(ids: np.ndarray, starts: np.ndarray, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(np.stack([ids[s:s + T + 1] for s in starts]))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--books", type=Path, default=DEFAULT_BOOKS)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--cutoffs", default="2000,10000")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-chars", type=int, default=0, help="characters read in all (0 = every book whole)")
    parser.add_argument("--head-tokens", type=int, default=4096, help="hidden states in the head-only timing")
    parser.add_argument("--head-repeats", type=int, default=10)
    parser.add_argument("--head-vocabs", default="",
                        help="also time the head alone at these vocabulary sizes (comma-separated), targets drawn from "
                             "a Zipf(1) law and cutoffs at the same fractions of the vocabulary: where it starts to pay")
    parser.add_argument("--head-only", action="store_true", help="skip the training comparison")
    args = parser.parse_args()
    if args.head_vocabs:
        for V in (int(v) for v in args.head_vocabs.split(",")):
            counts = 1.0 / np.arange(1, V + 1)  # Zipf: frequency ~ 1 / rank
            scaled = [max(1, round(c * V / args.vocab)) for c in (int(c) for c in args.cutoffs.split(","))]
            head_only(V, args.width, scaled, counts, args.head_tokens, args.head_repeats)
    if args.head_only:
        return
    cutoffs = [int(c) for c in args.cutoffs.split(",")]
    started = time.perf_counter()
    train, val, counts = corpus(args.books, args.vocab, args.max_chars)
    V = int(counts.shape[0])
    in_shortlist = float(counts[:cutoffs[0]].sum() / counts.sum())

    models = {}
    for kind in ("full", "adaptive"):
        torch.manual_seed(0)
        config = preset("llama-tiny", vocab_size=V, hidden_size=args.width, num_layers=args.layers, num_heads=4,
                        num_kv_heads=4, intermediate_size=int(args.width * 8 / 3) // 16 * 16,
                        max_seq_len=args.seq_len, tie_word_embeddings=False,
                        head_cutoffs=cutoffs if kind == "adaptive" else [])
        model = Transformer(config).train()
        models[kind] = (model, torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0))
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {k: [] for k in models}
    for step in range(args.steps):
        inputs, targets = windows(train, rng.integers(0, len(train) - args.seq_len - 1, args.batch), args.seq_len)
        for kind, (model, optimizer) in models.items():  # in turn: the machine's load hits both alike
            t0 = time.perf_counter()
            loss = causal_lm_loss(model, inputs, targets)
            (loss.total / loss.count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[kind].append(time.perf_counter() - t0)
    val_starts = np.arange(0, len(val) - args.seq_len - 1, args.seq_len)[:128]
    results = {}
    for kind, (model, _) in models.items():
        model.eval()
        total = count = 0.0
        with torch.no_grad():
            for i in range(0, len(val_starts), 32):
                inputs, targets = windows(val, val_starts[i:i + 32], args.seq_len)
                total += model(inputs, targets=targets).item()
                count += targets.numel()
        step_s = statistics.median(times[kind][min(5, len(times[kind]) - 1):])  # after warm-up
        results[kind] = dict(tokens_per_s=args.batch * args.seq_len / step_s, val_loss=total / count,
                             params=model.num_parameters())
    for kind in ("adaptive", "full"):
        r = results[kind]
        print(json.dumps({"bench": "adaptive_softmax_training", "head": kind, "vocab": V, "cutoffs": cutoffs,
                          "steps": args.steps, "seq_len": args.seq_len, "tokens_per_step": args.batch * args.seq_len,
                          "tokens_per_s": round(r["tokens_per_s"], 1), "val_loss": round(r["val_loss"], 4),
                          "parameters": r["params"], "peer": "full softmax (same model, same batches)",
                          "peer_tokens_per_s": round(results["full"]["tokens_per_s"], 1),
                          "peer_val_loss": round(results["full"]["val_loss"], 4),
                          "speed_ratio": round(r["tokens_per_s"] / results["full"]["tokens_per_s"], 3),
                          "shortlist_token_share": round(in_shortlist, 3),
                          "wall_s": round(time.perf_counter() - started, 1), **machine()}))
    head_only(V, args.width, cutoffs, counts, args.head_tokens, args.head_repeats)


def head_only(V: int, d: int, cutoffs: list[int], counts: np.ndarray, N: int = 4096, repeats: int = 10) -> None:
    """Forward + backward of the head and its loss alone, best of `repeats`."""
    torch.manual_seed(0)
    hidden = torch.randn(N, d, requires_grad=True)
    targets = torch.from_numpy(np.random.default_rng(1).choice(V, size=N, p=counts / counts.sum()))
    weight = torch.nn.Parameter(torch.randn(V, d) * 0.02)
    ours = AdaptiveSoftmaxHead(d, V, cutoffs, div_value=4.0)
    theirs = torch.nn.AdaptiveLogSoftmaxWithLoss(d, V, cutoffs, div_value=4.0)
    theirs.load_state_dict(ours.state_dict())
    cases = {
        "full_fused": lambda: linear_cross_entropy(hidden, weight, targets).backward(),
        "full_unfused": lambda: F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum").backward(),
        "adaptive": lambda: ours.loss(hidden, targets).backward(),
        "torch_adaptive": lambda: (theirs(hidden, targets).loss * N).backward(),
    }
    seconds = {name: best_seconds(fn, repeats=repeats, warmup=2) for name, fn in cases.items()}
    for name, s in seconds.items():
        print(json.dumps({"bench": "adaptive_softmax_head", "case": name, "tokens": N, "vocab": V, "width": d,
                          "cutoffs": cutoffs,
                          "ms": round(s * 1e3, 2), "peer": "full_fused",
                          "peer_ms": round(seconds["full_fused"] * 1e3, 2),
                          "speedup_vs_peer": round(seconds["full_fused"] / s, 2), **machine()}))


if __name__ == "__main__":
    main()
