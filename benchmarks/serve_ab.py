"""Serving A/B: two or more `lmstack serve` command lines, measured in the same run at concurrency 8.

    python benchmarks/serve_ab.py --variant "--engine process" --variant "--engine thread" [--rounds 6]

Each variant is a server of its own (benchmarks/serve.py's model, client and flags, plus the variant's), all
started at once; each round runs the offline peer (`lmstack.generate` of 8 prompts, text) and then one
concurrency-8 case per variant, so that the load of a shared machine weighs on all of them alike. One JSON line
per variant: the median over rounds of its tokens/s / the peer's of the same round ("vs_offline_8", the
figure benchmarks/serve.py reports), every round's ratio, and its scheduler time per step in the median round.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
from pathlib import Path

import torch
from decode import machine  # benchmarks/decode.py: CPU model and vector flags, detected
from serve import Server, build_model, concurrency_case, offline_tokens_per_s

import lmstack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True,
                        help="extra `lmstack serve` flags of one server (repeat: one per variant)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    case = argparse.Namespace(max_tokens=args.max_tokens, requests_per_slot=2)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "model"
        model, tokenizer = build_model(directory)
        vocab = tokenizer.vocab_size
        servers = []
        try:
            for variant in args.variant:
                servers.append(Server(directory, args.threads, None, extra=variant.split()))
            for server in servers:  # warm-up
                concurrency_case(server.base, 8, argparse.Namespace(max_tokens=4, requests_per_slot=1), rng, vocab)
            lmstack.generate(model, tokenizer, [[10] * 32] * 8, max_new_tokens=4, ignore_eos=True)
            ratios: list[list[float]] = [[] for _ in servers]
            lines: list[list[dict]] = [[] for _ in servers]
            load = [os.getloadavg()[0]]
            for _ in range(args.rounds):
                offline = offline_tokens_per_s(model, tokenizer, 8, case, rng, vocab)
                for i, server in enumerate(servers):
                    line = concurrency_case(server.base, 8, case, rng, vocab)
                    ratios[i].append(line["tokens_per_s"] / offline)
                    lines[i].append(line)
            load.append(os.getloadavg()[0])
            info = machine() | {"threads": args.threads, "load_average": [round(x, 2) for x in load]}
            for variant, r, ls in zip(args.variant, ratios, lines):
                median = sorted(ls, key=lambda line: line["tokens_per_s"])[len(ls) // 2]
                print(json.dumps({"case": "serve_ab", "variant": variant, "vs_offline_8": round(statistics.median(r), 2),
                                  "vs_offline_8_rounds": [round(x, 2) for x in r],
                                  "tokens_per_s_rounds": [line["tokens_per_s"] for line in ls],
                                  "scheduler_per_step": median["scheduler_per_step"]} | info), flush=True)
        finally:
            for server in servers:
                server.close()


if __name__ == "__main__":
    main()
