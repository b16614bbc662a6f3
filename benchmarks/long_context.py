"""Perplexity beyond the trained context with each RoPE scaling, on a small model trained here (issue 17).

A Llama-style model (plain RoPE, theta 10000) is pretrained at context L on ../shared/data: by default
tinyshakespeare at character level (`--corpus shakespeare-char`, context 64, the last 10% held out, as
nanoGPT's split), or the Gutenberg books with byte-level BPE (`--corpus gutenberg-bpe`, 4096 tokens). It is
then evaluated without any fine-tuning on held-out windows of L, 2L and 4L tokens, with the frequencies each `rope_scaling` kind gives for the
factor s = window / L: none (extrapolation), linear (position interpolation), ntk (static NTK-aware),
dynamic (NTK growing with the length), yarn, llama3, and longrope. LongRoPE's factors come from an
evolutionary search in its paper; here (no search) the long factors are YaRN's per-frequency
interpolation ratios and the short ones 1, so the row shows LongRoPE's switch and attention factor on
YaRN-like frequencies.

Prints one JSON line per (method, window): perplexity over every position of the windows and over the
positions past L alone, with plain RoPE at the trained length (the peer) in the same line, and the
unigram perplexity of the held-out text (what a model that ignores context scores) to show how much
the model has learned.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import machine  # noqa: E402
from lmstack import Transformer, preset  # noqa: E402
from lmstack.config import RopeScaling  # noqa: E402
from lmstack.model.rope import rope_inv_freq  # noqa: E402
from lmstack.tokenizer import train_tokenizer  # noqa: E402
from lmstack.train.objectives import causal_lm_loss  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
METHODS = ("none", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope")


def scaling(method: str, factor: float, trained: int, model_config) -> RopeScaling:
    if method == "none" or factor == 1.0 and method != "dynamic":
        return RopeScaling()
    if method == "llama3":
        return RopeScaling(kind="llama3", factor=factor, original_max_position_embeddings=trained)
    if method == "longrope":
        yarn = model_config.replace(rope_scaling=RopeScaling(kind="yarn", factor=factor,
                                                             original_max_position_embeddings=trained))
        plain = model_config.replace(rope_scaling=RopeScaling())
        ratio = (rope_inv_freq(plain) / rope_inv_freq(yarn)).tolist()  # per-frequency divisors
        return RopeScaling(kind="longrope", factor=factor, original_max_position_embeddings=trained,
                           short_factor=[1.0] * len(ratio), long_factor=ratio)
    return RopeScaling(kind=method, factor=factor, original_max_position_embeddings=trained)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=("shakespeare-char", "gutenberg-bpe"), default="shakespeare-char")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens per window length")
    parser.add_argument("--max-chars", type=int, default=0,
                        help="read at most this many characters in all (the start of each book; 0 = everything)")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.corpus == "shakespeare-char":
        text = (args.data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
        texts = [text[:args.max_chars] if args.max_chars else text]
        tok = train_tokenizer(iter(texts), "char", vocab_size=None)
        ids = np.array(tok.encode(texts[0]))
        split = int(len(ids) * 0.9)
    else:
        paths = sorted((args.data / "gutenberg_nltk").glob("*.txt"))
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
        if args.max_chars:  # a shorter run on a busy machine: the tokenizer and the held-out split shrink with it
            texts = [t[:args.max_chars // len(paths)] for t in texts]
        tok = train_tokenizer(iter(texts), "bpe", vocab_size=4096)
        ids = np.concatenate([np.array(tok.encode(t) + [tok.eos_token_id]) for t in texts])
        split = int(len(ids) * 0.95)
    train, val = torch.from_numpy(ids[:split]), torch.from_numpy(ids[split:])
    # the unigram model fitted on the training split, scored on the held-out split (add-one smoothing)
    counts = np.bincount(ids[:split], minlength=tok.vocab_size) + 1.0
    unigram = math.exp(-np.log(counts / counts.sum())[ids[split:]].mean())
    L = args.context

    torch.manual_seed(0)
    config = preset("llama-tiny", vocab_size=tok.vocab_size, hidden_size=args.hidden, num_layers=args.layers,
                    num_heads=args.heads, num_kv_heads=args.heads, intermediate_size=args.hidden * 8 // 3 // 8 * 8,
                    max_seq_len=L, rope_theta=10000.0)
    model = Transformer(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    for step in range(args.steps):
        for group in optimizer.param_groups:  # warmup, then cosine to 10%
            group["lr"] = args.lr * min(1.0, (step + 1) / 50) * (0.55 + 0.45 * math.cos(math.pi * step / args.steps))
        starts = rng.integers(0, len(train) - L - 1, args.batch)
        rows = torch.stack([train[s:s + L + 1] for s in starts])
        loss = causal_lm_loss(model, rows[:, :-1], rows[:, 1:])
        (loss.total / loss.count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss {(loss.total / loss.count).item():.3f}", file=sys.stderr, flush=True)
    train_s = time.perf_counter() - started
    state = model.state_dict()

    def perplexity(method: str, window: int) -> tuple[float, float | None]:
        extended = config.replace(max_seq_len=4 * L, rope_scaling=scaling(method, window / L, L, config))
        evaluated = Transformer(extended).eval()
        evaluated.load_state_dict(state)
        count = args.eval_tokens // window
        rows = torch.stack([val[i * window:i * window + window + 1] for i in range(count)])
        with torch.no_grad():
            logp = torch.cat([evaluated(rows[i:i + 8, :-1]).log_softmax(-1) for i in range(0, count, 8)])
        nll = -logp.gather(-1, rows[:, 1:, None])[..., 0]  # (count, window)
        tail = math.exp(nll[:, L:].mean().item()) if window > L else None
        return math.exp(nll.mean().item()), tail

    peer, _ = perplexity("none", L)
    for window in (L, 2 * L, 4 * L):
        for method in METHODS:
            if window == L and method != "none":
                continue
            ppl, tail = perplexity(method, window)
            print(json.dumps({"bench": "long_context", "method": method, "trained_context": L, "window": window,
                              "factor": window / L, "perplexity": round(ppl, 2),
                              "perplexity_past_trained": None if tail is None else round(tail, 2),
                              "peer": "plain RoPE at the trained context", "peer_perplexity": round(peer, 2),
                              "ratio": round(ppl / peer, 3), "unigram_perplexity": round(unigram, 2),
                              "corpus": args.corpus, "vocab": tok.vocab_size,
                              "model": f"{args.layers}x{args.hidden}", "train_steps": args.steps,
                              "train_tokens": args.steps * args.batch * L, "train_s": round(train_s, 1),
                              "batch": args.batch, "chars_read": sum(len(t) for t in texts),
                              **machine()}))


if __name__ == "__main__":
    main()
