"""Prometheus text exposition (format 0.0.4) of the server's counters, written by hand: a handful of
counters, gauges and one histogram do not need a client library.

The scheduler thread updates these; /metrics reads them. A scrape may see a counter one step behind
another, which Prometheus tolerates.
"""

from __future__ import annotations

import threading
import time
from collections import deque

# Time-to-first-token buckets (seconds): vLLM's, from interactive to a long queue.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
RATE_WINDOW_S = 10.0  # tokens/s is measured over the last ten seconds


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus histograms are exposed."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts = buckets, [0] * len(buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{bound}"}} {count}' for bound, count in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Metrics:
    """What the scheduler counts; `render` writes it in Prometheus' text format."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.finished: dict[str, int] = {}  # requests by outcome: stop, length, cancelled, error
        self.rejected = 0  # 429s
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_hits = self.prefix_misses = 0
        self.decode_steps = 0
        self.kv_pool_bytes = 0  # the KV pool's memory, allocated once: rows x slots x layers x (K + V)
        # Scheduler thread time by phase: idle (nothing to run), admit (releases and prefills), step (a decode
        # step: the model, sampling, the host sync, detokenisation), dispatch (handing events to the clients)
        self.scheduler_seconds = {"idle": 0.0, "admit": 0.0, "step": 0.0, "dispatch": 0.0}
        self.idle_since: float | None = None  # perf_counter() when the scheduler began to idle, while it does
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step, the last RATE_WINDOW_S

    def tokens_generated(self, count: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.generation_tokens += count
            self._recent.append((now, count))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def request_finished(self, outcome: str) -> None:
        with self.lock:
            self.finished[outcome] = self.finished.get(outcome, 0) + 1

    # What an engine process counts and sends to the web process with each report (lmstack.serve.engine); the
    # web process counts the rest itself: 429s, and generated tokens as their events arrive. idle_since is a
    # perf_counter() reading: CLOCK_MONOTONIC on Linux, one clock for both processes.
    ENGINE_FIELDS = ("finished", "prompt_tokens", "prefix_hits", "prefix_misses", "decode_steps", "kv_pool_bytes",
                     "scheduler_seconds", "idle_since")

    def engine_state(self) -> dict:
        with self.lock:
            state = {name: getattr(self, name) for name in self.ENGINE_FIELDS}
            return state | {"ttft": [self.ttft.counts, self.ttft.sum, self.ttft.count]}

    def load_engine_state(self, state: dict) -> None:
        with self.lock:
            for name in self.ENGINE_FIELDS:
                setattr(self, name, state[name])
            self.ttft.counts, self.ttft.sum, self.ttft.count = state["ttft"]

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            recent = [(t, n) for t, n in self._recent if t >= now - RATE_WINDOW_S]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span

    def render(self, running: int, waiting: int, rows_used: int, rows_total: int) -> str:
        def metric(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
            return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]

        with self.lock:
            finished = dict(self.finished)
            seconds = dict(self.scheduler_seconds)
            if self.idle_since is not None:  # idling now: the wait so far
                seconds["idle"] += max(time.perf_counter() - self.idle_since, 0.0)
            lines = (
                metric("lmstack_requests_running", "gauge", "Requests generating in the running batch.",
                       [f"lmstack_requests_running {running}"])
                + metric("lmstack_requests_waiting", "gauge", "Requests queued for KV memory.",
                         [f"lmstack_requests_waiting {waiting}"])
                + metric("lmstack_kv_rows_used", "gauge", "KV pool rows holding a request.",
                         [f"lmstack_kv_rows_used {rows_used}"])
                + metric("lmstack_kv_rows_total", "gauge", "KV pool rows.", [f"lmstack_kv_rows_total {rows_total}"])
                + metric("lmstack_kv_pool_bytes", "gauge", "Memory of the KV pool, allocated at start.",
                         [f"lmstack_kv_pool_bytes {self.kv_pool_bytes}"])
                + metric("lmstack_requests_finished_total", "counter", "Requests finished, by outcome.",
                         [f'lmstack_requests_finished_total{{outcome="{k}"}} {v}' for k, v in sorted(finished.items())])
                + metric("lmstack_requests_rejected_total", "counter", "Requests answered 429 (queue full).",
                         [f"lmstack_requests_rejected_total {self.rejected}"])
                + metric("lmstack_prompt_tokens_total", "counter", "Prompt tokens admitted.",
                         [f"lmstack_prompt_tokens_total {self.prompt_tokens}"])
                + metric("lmstack_generation_tokens_total", "counter", "Tokens generated.",
                         [f"lmstack_generation_tokens_total {self.generation_tokens}"])
                + metric("lmstack_prefix_cache_hits_total", "counter", "Prompts whose prefix came from the cache.",
                         [f"lmstack_prefix_cache_hits_total {self.prefix_hits}"])
                + metric("lmstack_prefix_cache_misses_total", "counter", "Prompts with a cacheable prefix not cached.",
                         [f"lmstack_prefix_cache_misses_total {self.prefix_misses}"])
                + metric("lmstack_decode_steps_total", "counter", "Decode steps of the running batch.",
                         [f"lmstack_decode_steps_total {self.decode_steps}"])
                + metric("lmstack_scheduler_seconds_total", "counter", "Scheduler thread time, by phase.",
                         [f'lmstack_scheduler_seconds_total{{phase="{k}"}} {v:.6f}'
                          for k, v in seconds.items()])
                + metric("lmstack_time_to_first_token_seconds", "histogram",
                         "Seconds from a request's arrival to its first token.",
                         self.ttft.lines("lmstack_time_to_first_token_seconds")))
        lines += metric("lmstack_generation_tokens_per_second", "gauge",
                        f"Tokens generated per second over the last {RATE_WINDOW_S:g} s.",
                        [f"lmstack_generation_tokens_per_second {self.tokens_per_second():.3f}"])
        return "\n".join(lines) + "\n"
