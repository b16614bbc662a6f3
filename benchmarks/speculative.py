"""Speculative decoding: acceptance rate and speed-up over plain greedy decoding of the same target, fp32.

Random models make meaningless drafts, so both models are first trained, 600 steps each by default
(byte-level, on tinyshakespeare from ../shared/data, or on the interpreter's own documentation when that
is absent): target = 6 layers x 256 wide (4.4M params), draft = 1 layer x 128 wide (0.23M params), same 256-byte
vocabulary. Then greedy generation of 128 new tokens from held-out prompts, batch 1, with and without the
draft; the outputs are checked identical. Peer: the target's own greedy decoding in the same run.

Prints exactly one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lmstack
from lmstack.config import ModelConfig
from decode import machine  # benchmarks/decode.py (the script's own directory is on sys.path)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare"


def corpus() -> tuple[bytes, str]:
    files = sorted(DATA.glob("*.txt")) if DATA.is_dir() else []
    if files:
        return files[0].read_bytes(), str(files[0].name)
    import pydoc_data.topics

    return "\n".join(pydoc_data.topics.topics.values()).encode(), "pydoc_data.topics"


def train(model: lmstack.Transformer, data: torch.Tensor, steps: int, batch: int, seq: int, lr: float) -> float:
    """Plain next-byte training with AdamW; returns the last loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    generator = torch.Generator().manual_seed(0)
    loss = torch.tensor(0.0)
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
        x = torch.stack([data[s:s + seq] for s in starts])  # (B, T)
        y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:  # linear decay: a short run still ends settled
            group["lr"] = lr * (1 - step / steps)
        optimizer.step()
    model.eval()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps for each model (600: ~80 s)")
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=4)
    args = parser.parse_args()

    text, source = corpus()
    data = torch.tensor(list(text), dtype=torch.long)
    split = int(0.9 * len(data))
    torch.manual_seed(0)
    base = dict(vocab_size=256, max_seq_len=512, tie_word_embeddings=True)
    target = lmstack.Transformer(ModelConfig(hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2,
                                             intermediate_size=688, **base))
    draft = lmstack.Transformer(ModelConfig(hidden_size=128, num_layers=1, num_heads=2, num_kv_heads=1,
                                            intermediate_size=384, **base))
    start = time.perf_counter()
    target_loss = train(target, data[:split], args.steps, 8, 64, 3e-3)
    draft_loss = train(draft, data[:split], args.steps, 8, 64, 1e-2)
    train_s = time.perf_counter() - start

    held_out = data[split:]
    prompts = [held_out[i * 997:i * 997 + 48].tolist() for i in range(args.prompts)]
    plain_s = spec_s = 0.0
    accepted = []
    for prompt in prompts:
        lmstack.generate(target, None, [prompt], max_new_tokens=8, ignore_eos=True)  # warm-up
        t = time.perf_counter()
        plain = lmstack.generate(target, None, [prompt], max_new_tokens=args.new_tokens, ignore_eos=True)
        plain_s += time.perf_counter() - t
        t = time.perf_counter()
        spec = lmstack.generate(target, None, [prompt], max_new_tokens=args.new_tokens, ignore_eos=True,
                                draft_model=draft, num_draft_tokens=args.draft_tokens)
        spec_s += time.perf_counter() - t
        if spec.token_ids != plain.token_ids:
            raise SystemExit("speculative output differs from the target's greedy output")
        accepted.append(spec.stats.acceptance_rate)
    tokens = args.new_tokens * len(prompts)
    print(json.dumps({
        "benchmark": "speculative", "corpus": source, "train_steps": args.steps, "train_s": round(train_s, 1),
        "target_params": target.num_parameters(), "draft_params": draft.num_parameters(),
        "target_loss": round(target_loss, 3), "draft_loss": round(draft_loss, 3),
        "draft_tokens": args.draft_tokens, "acceptance_rate": round(sum(accepted) / len(accepted), 3),
        "lmstack_tok_s": round(tokens / spec_s, 1), "peer_tok_s": round(tokens / plain_s, 1),
        "peer": "the same target, plain greedy lmstack.generate", "ratio": round(plain_s / spec_s, 2),
        "outputs_identical": True, **machine(),
    }))


if __name__ == "__main__":
    main()
