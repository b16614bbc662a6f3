"""Serving: `lmstack serve` under load, measured by a client in the style of vLLM's serving benchmark.

The server runs in its own process (`python -m lmstack serve`, --max-batch 16) on loopback; this process is
the client (asyncio on uvloop when installed, one hand-written keep-alive HTTP/1.1 connection per concurrent
client, streaming completions, server-sent events split by hand). Model: a random llama (vocab 2048 from a BPE tokenizer trained here, width 256, 4 layers, context
1024; 3.5M parameters), fp32 on the CPU.

Cases (one JSON line each):
- concurrency_C for C in 1, 2, 4, 8, 16: fixed concurrency, --requests-per-slot x C requests (at least 4) of
  a 32-token prompt and --max-tokens new tokens (EOS ignored). TTFT, TPOT = (E2E - TTFT) / (n_out - 1) and
  ITL (gaps between chunks), p50/p99 in ms, the aggregate output tokens/s, and the server's scheduler time
  per decode step by phase (from /metrics, scraped by the client just before its first request and after
  its last). n_out is the server's count of completion tokens (the stream's usage chunk): a token that
  completes no character sends no chunk of its own, so chunks undercount tokens (by ~12% on this random
  model). --rounds rounds of every level and the offline peer, interleaved; each line is the median round,
  with every round's tokens/s.
- scaling: "scaling_8" = tokens/s at concurrency 8 / at 1 (goal >= 4); "vs_offline_8" = tokens/s at
  concurrency 8 / offline `lmstack.generate(model, tokenizer, 8 prompts)` in this process, the median of the
  per-round ratios (goal >= 0.8), with the peer's figures. That peer makes text, as the server must (it
  decodes each token incrementally); "vs_offline_ids_8" is against the same call without a tokenizer (ids).
- soak: --soak requests (default 100; --full: 1,000) of 8-64 prompt tokens and 4-24 new ones, sampled, at
  concurrency 16, 20% of clients disconnecting after their second chunk, after a warm-up on 10% of the same
  mix; then "leaked_blocks" = KV pool rows still held (goal 0), the server's outcomes, and its RSS (with its
  engine process, with --engine process) after the warm-up, halfway and after the soak.
- prefix_cache: "prefix_cache_ttft_ratio" = median TTFT of chats whose ~580-token system prompt is new each
  time (computed) / median TTFT of chats repeating one cached system prompt (goal >= 3).

Threads: the server gets --threads (OMP_NUM_THREADS and torch), the offline peer the same. Timings on a
shared machine are noisy: the ratios are what to read.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import torch
from decode import machine  # benchmarks/decode.py: CPU model and vector flags, detected

import lmstack

try:  # the client's event loop: uvloop when installed (the serve extra), as uvicorn's is
    from uvloop import run
except ImportError:
    from asyncio import run

CONFIG = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 704,
          "max_seq_len": 1024, "tie_word_embeddings": True}
PROMPT_TOKENS = 32


def build_model(directory: Path) -> tuple[object, object]:
    import pydoc_data.topics

    from lmstack.config import ModelConfig
    from lmstack.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(iter(pydoc_data.topics.topics.values()), "bpe", 2048, chat_template="chatml")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id, **CONFIG)
    model = lmstack.Transformer(config).eval()
    lmstack.save_model(model, directory, extra_files=tokenizer.files())
    return model, tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan")}
    ordered = sorted(values)

    def pick(q: float) -> float:  # nearest rank
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": round(pick(0.5) * 1e3, 2), "p99": round(pick(0.99) * 1e3, 2)}


class Connection:
    """One keep-alive HTTP/1.1 connection to the server, written by hand: a streaming POST at a time, the
    response's chunks (one per server step) as they arrive. The client shares the machine's two cores with the
    server (the offline peer has no such neighbour), and httpx spent ~3 ms of CPU per decode step at
    concurrency 8 (measured from /proc), a third of the model's step; this spends a fraction of that."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path.encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, body: dict) -> AsyncIterator[bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        payload = json.dumps(body).encode()
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d"
                          b"\r\n\r\n%s" % (self.path, self.host.encode(), len(payload), payload))
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, value = line.decode().split(":", 1)
            headers[name.strip().lower()] = value.strip()
        if status != 200 or headers.get("transfer-encoding") != "chunked":
            text = await self.reader.readexactly(int(headers.get("content-length", 0)))
            raise RuntimeError(f"HTTP {status}: {text[:200]!r}")
        while size := int((await self.reader.readline()).split(b";")[0], 16):
            yield (await self.reader.readexactly(size + 2))[:-2]
        await self.reader.readline()  # the empty line after the last chunk: the connection is ready again

    def close(self) -> None:
        """Disconnect (the server sees the client leave)."""
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def one_request(connection: Connection, body: dict, leave_after: int | None = None) -> dict:
    """Stream one request; the arrival times of its chunks. leave_after: disconnect after that many chunks.

    Server-sent events are split by hand; chunks that arrive in one read share its arrival time."""
    start, times, tail, tokens = time.perf_counter(), [], b"", None
    stream = connection.post({**body, "stream": True, "stream_options": {"include_usage": True}})
    try:
        async for data in stream:
            now = time.perf_counter()
            *events, tail = (tail + data).split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: {"):
                    continue
                chunk = json.loads(event[6:])
                choices = chunk["choices"]
                if choices and (choices[0].get("text") or choices[0].get("delta", {}).get("content")):
                    times.append(now)
                elif not choices and chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
            if leave_after is not None and len(times) >= leave_after:
                connection.close()
                break
    finally:
        await stream.aclose()
    end = time.perf_counter()
    # Tokens, not chunks: a token that completes no character (part of a multi-byte one) sends no chunk
    # (its text goes with the next), so chunks undercount the tokens; the usage chunk has the server's count.
    return {"ttft": times[0] - start if times else None, "e2e": end - start, "chunks": len(times),
            "tokens": len(times) if tokens is None else tokens,
            "itl": [b - a for a, b in itertools.pairwise(times)]}


async def run_concurrent(url: str, bodies: list[dict], concurrency: int, leave: set[int] = frozenset(),
                         counters: list | None = None) -> tuple:
    """Every body's result and the wall time: `concurrency` clients, each with its own keep-alive connection,
    take the bodies in turn. counters: appended the server's scheduler counters just before the first request
    and just after the last (so that they cover the same time as the wall time)."""
    todo = iter(enumerate(bodies))
    results: list[dict | None] = [None] * len(bodies)

    async def client() -> None:
        connection = Connection(url)
        for i, body in todo:
            results[i] = await one_request(connection, body, 2 if i in leave else None)
        connection.close()

    base = url.split("/v1/")[0]
    async with httpx.AsyncClient(timeout=60) as scraper:
        if counters is not None:
            counters.append(parse_counters((await scraper.get(base + "/metrics")).text))
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        if counters is not None:
            counters.append(parse_counters((await scraper.get(base + "/metrics")).text))
    return results, wall


def concurrency_case(base: str, concurrency: int, args, rng: random.Random, vocab: int) -> dict:
    n = max(4, args.requests_per_slot * concurrency)
    bodies = [{"prompt": [rng.randrange(10, vocab) for _ in range(PROMPT_TOKENS)], "max_tokens": args.max_tokens,
               "ignore_eos": True, "temperature": 0} for _ in range(n)]
    counters: list[dict[str, float]] = []
    results, wall = run(run_concurrent(base + "/v1/completions", bodies, concurrency, counters=counters))
    scheduler = per_step(*counters)
    out_tokens = sum(r["tokens"] for r in results)
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1 and r["chunks"]]
    return {"case": f"concurrency_{concurrency}", "requests": n, "output_tokens": out_tokens,
            "tokens_per_s": round(out_tokens / wall, 2),
            "ttft_ms": percentiles([r["ttft"] for r in results]), "tpot_ms": percentiles(tpot),
            "itl_ms": percentiles([g for r in results for g in r["itl"]]), "scheduler_per_step": scheduler}


def offline_tokens_per_s(model, tokenizer, batch: int, args, rng: random.Random, vocab: int) -> float:
    """Output tokens/s of one `lmstack.generate` of `batch` fresh prompts at once (warm it up first). With a
    tokenizer it returns texts, decoded token by token as the server streams them; without, ids only."""
    prompts = [[rng.randrange(10, vocab) for _ in range(PROMPT_TOKENS)] for _ in range(batch)]
    start = time.perf_counter()
    out = lmstack.generate(model, tokenizer, prompts, max_new_tokens=args.max_tokens, ignore_eos=True)
    return sum(len(t) for t in out.token_ids) / (time.perf_counter() - start)


def prefix_case(base: str, tokenizer) -> dict:
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics.values())
    words = text.split()

    def system(offset: int) -> str:  # about 500 tokens of documentation text
        piece = " ".join(words[offset:offset + 330])
        return piece

    def chat(system_text: str, question: str) -> dict:
        return {"messages": [{"role": "system", "content": system_text}, {"role": "user", "content": question}],
                "max_tokens": 4, "temperature": 0}

    tokens = len(tokenizer.encode(system(0)))
    url = base + "/v1/chat/completions"
    uncached = [run(run_concurrent(url, [chat(system(5000 + 400 * i), "Why?")], 1))[0][0]["ttft"]
                for i in range(6)]
    run(run_concurrent(url, [chat(system(0), "Warm up?")], 1))  # computes and caches the prefix
    cached = [run(run_concurrent(url, [chat(system(0), f"Question {i}?")], 1))[0][0]["ttft"]
              for i in range(6)]
    return {"case": "prefix_cache", "system_prompt_tokens": tokens,
            "ttft_uncached_ms": round(statistics.median(uncached) * 1e3, 2),
            "ttft_cached_ms": round(statistics.median(cached) * 1e3, 2),
            "prefix_cache_ttft_ratio": round(statistics.median(uncached) / statistics.median(cached), 2)}


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (the server's engine process), MiB."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) / 1024
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        total += rss_mib(int(child))
    return total


def gauge(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def parse_counters(metrics: str) -> dict[str, float]:
    """The server's decode steps and scheduler seconds by phase (from /metrics)."""
    out = {}
    for line in metrics.splitlines():
        if line.startswith("lmstack_decode_steps_total "):
            out["steps"] = float(line.split()[1])
        elif line.startswith("lmstack_scheduler_seconds_total{"):
            out[line.split('"')[1]] = float(line.split()[1])
    return out


def per_step(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Milliseconds per decode step in each scheduler phase between two scrapes."""
    steps = max(after["steps"] - before["steps"], 1)
    return {"decode_steps": int(steps)} | {f"{k}_ms": round((after[k] - before[k]) / steps * 1e3, 2)
                                           for k in ("step", "dispatch", "admit", "idle")}


def soak_case(base: str, pid: int, count: int, rng: random.Random, vocab: int) -> dict:
    bodies = [{"prompt": [rng.randrange(10, vocab) for _ in range(rng.randrange(8, 64))],
               "max_tokens": rng.randrange(4, 24), "ignore_eos": True, "temperature": 0.8, "seed": i}
              for i in range(count)]
    leave = set(rng.sample(range(count), count // 5))
    warm = max(16, count // 10)  # the same mix, so that the allocator has seen its shapes before the baseline
    run(run_concurrent(base + "/v1/completions", bodies[:warm], 16, {i for i in leave if i < warm}))
    drain(base)
    before, outcomes = rss_mib(pid), finished(base)
    start, results, halfway = time.perf_counter(), [], 0.0
    for half in (range(count // 2), range(count // 2, count)):  # RSS at half time too: growth or a plateau
        if results:
            drain(base)
            halfway = rss_mib(pid)
        part, _ = run(run_concurrent(base + "/v1/completions", [bodies[i] for i in half], 16,
                                     {i - half.start for i in leave if i in half}))
        results += part
    wall = time.perf_counter() - start
    drain(base)
    after = rss_mib(pid)
    return {"case": "soak", "requests": count, "disconnected": len(leave), "seconds": round(wall, 1),
            "outcomes": {k: v - outcomes.get(k, 0) for k, v in finished(base).items()},
            "client_chunks": sum(r["chunks"] for r in results),
            "leaked_blocks": int(gauge(base, "lmstack_kv_rows_used")),
            "running_after": int(gauge(base, "lmstack_requests_running")),
            "waiting_after": int(gauge(base, "lmstack_requests_waiting")),
            "rss_after_warmup_mib": round(before, 1), "rss_halfway_mib": round(halfway, 1),
            "rss_after_soak_mib": round(after, 1),
            "rss_growth_mib": round(after - before, 1)}


def finished(base: str) -> dict[str, int]:
    """The server's finished requests by outcome (stop, length, cancelled, error)."""
    out = {}
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith("lmstack_requests_finished_total{"):
            out[line.split('"')[1]] = int(float(line.split()[1]))
    return out


def drain(base: str, timeout: float = 10.0) -> None:
    """Wait until the server holds no KV rows and runs no request (disconnects are seen a step later)."""
    deadline = time.monotonic() + timeout
    while (gauge(base, "lmstack_kv_rows_used") or gauge(base, "lmstack_requests_running")) \
            and time.monotonic() < deadline:
        time.sleep(0.05)


class Server:
    """`python -m lmstack serve` in its own process on a free loopback port."""

    def __init__(self, directory: Path, threads: int, max_len: int | None, engine: str = "thread",
                 extra: list[str] = ()):
        """extra: more `lmstack serve` flags (benchmarks/serve_ab.py's variants; the last of a flag wins)."""
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        command = [sys.executable, "-m", "lmstack", "serve", "--model", str(directory), "--port", str(port),
                   "--max-batch", "16", "--max-queue", "2000", "--log-level", "warning", "--engine", engine]
        command += (["--max-len", str(max_len)] if max_len else []) + list(extra)
        self.process = subprocess.Popen(command, env=env)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(self.base + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError("the server did not start")
            time.sleep(0.1)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the server and the offline peer (default 1: a 3.5M-parameter model "
                             "gains nothing from more, and OpenMP spin-waits collapse on a shared machine)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every level and the peer")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=None,
                        help="the server's KV slots per row (default: the model's context, as `lmstack serve`)")
    parser.add_argument("--requests-per-slot", type=int, default=2, help="requests per concurrency level x C")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--soak", type=int, default=100, help="soak requests (default 100)")
    parser.add_argument("--full", action="store_true", help="the full soak of 1,000 requests")
    parser.add_argument("--engine", choices=["thread", "process"], default="thread",
                        help="the server's --engine: the scheduler on a thread (default) or in a process of its own")
    parser.add_argument("--cases", nargs="+", choices=["throughput", "soak", "prefix"],
                        default=["throughput", "soak", "prefix"], help="which cases to run (default all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "model"
        model, tokenizer = build_model(directory)
        vocab = tokenizer.vocab_size
        info = machine() | {"threads": args.threads, "model_params": model.num_parameters(), "engine": args.engine,
                            "load_average": os.getloadavg()[0]}
        server = Server(directory, args.threads, args.max_len, args.engine)
        try:
            base = server.base
            if "throughput" not in args.cases:
                args.concurrency = []
            concurrency_case(base, 1, argparse.Namespace(max_tokens=4, requests_per_slot=1), rng, vocab)  # warm-up
            lmstack.generate(model, tokenizer, [[10] * PROMPT_TOKENS] * 8, max_new_tokens=4, ignore_eos=True)  # warm-up
            # Rounds of every level and the offline peer, interleaved, so that the load of a shared machine
            # weighs on both sides of a ratio alike; each figure is the median over the rounds.
            lines: dict[int, list[dict]] = {level: [] for level in args.concurrency}
            offline: list[float] = []  # the peer that makes text, as the server does
            offline_ids: list[float] = []  # the peer that makes ids only (no detokenisation)
            for _ in range(args.rounds):
                for level in args.concurrency:
                    lines[level].append(concurrency_case(base, level, args, rng, vocab))
                if 1 in lines and 8 in lines:
                    offline.append(offline_tokens_per_s(model, tokenizer, 8, args, rng, vocab))
                    offline_ids.append(offline_tokens_per_s(model, None, 8, args, rng, vocab))
            for level, runs in lines.items():
                ordered = sorted(runs, key=lambda line: line["tokens_per_s"])
                median = ordered[len(ordered) // 2]
                print(json.dumps(median | {"rounds": [r["tokens_per_s"] for r in runs], "max_len": args.max_len}
                                 | info), flush=True)
            if offline:
                c1, c8 = ([r["tokens_per_s"] for r in lines[level]] for level in (1, 8))
                print(json.dumps({"case": "scaling", "scaling_8": round(statistics.median(c8) / statistics.median(c1), 2),
                                  "vs_offline_8": round(statistics.median(a / b for a, b in zip(c8, offline)), 2),
                                  "vs_offline_8_rounds": [round(a / b, 2) for a, b in zip(c8, offline)],
                                  "offline_batch8_tokens_per_s": [round(o, 1) for o in offline],
                                  "vs_offline_ids_8": round(statistics.median(a / b for a, b in zip(c8, offline_ids)), 2),
                                  "offline_ids_batch8_tokens_per_s": [round(o, 1) for o in offline_ids],
                                  "served_c8_tokens_per_s": c8, "served_c1_tokens_per_s": c1} | info), flush=True)
            if "soak" in args.cases:
                soak = soak_case(base, server.process.pid, 1000 if args.full else args.soak, rng, vocab)
                print(json.dumps(soak | info), flush=True)
            if "prefix" in args.cases:  # a ~580-token system prompt: the rows must hold it
                print(json.dumps(prefix_case(base, tokenizer) | info), flush=True)
        finally:
            server.close()


if __name__ == "__main__":
    main()
