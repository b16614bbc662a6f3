"""Continuous batching: one thread drives a ContinuousBatch step by step; requests join and leave it.

    scheduler.submit(job)   # from the web handlers: queued, or QueueFull (-> 429)
    scheduler.cancel(job)   # the client went away: its rows are released before the next decode step
    job.emit(event)         # called from the scheduler thread: text pieces, then each choice's end

The KV pool is the batch's R rows x S slots, allocated once: a request holds n rows (one per choice) from
admission to its last token, so memory never grows with load. A request that does not fit waits in a
bounded FIFO queue; past `max_queue` waiting requests `submit` refuses (the server answers 429). A
request's rows are released the step it finishes or is cancelled, and only this thread touches the model.

Each loop: release cancelled jobs, admit waiting jobs while rows are free (their prefill runs here, with a
cached prefix when one matches), then one decode step for every running row.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmstack.device import autocast, resolve_precision
from lmstack.errors import LmstackError
from lmstack.generate.config import GenerationConfig
from lmstack.generate.continuous import ContinuousBatch
from lmstack.generate.stopping import SequenceState
from lmstack.model.protocol import CausalLM, model_device
from lmstack.serve.metrics import Metrics
from lmstack.serve.prefix import PrefixCache


class QueueFull(Exception):
    """The waiting queue holds max_queue requests already."""


@dataclass
class PromptScores:
    """The prompt's own log-probabilities (echo + logprobs): logprobs[0] is None (nothing predicts the first
    token); top[i] holds the `top_n` most likely ids at position i."""

    ids: list[int]
    logprobs: list[float | None]
    top: list[dict[int, float] | None]


@dataclass
class Event:
    """What a job hears from the scheduler, in order per choice: prompt scores (echo), text pieces, the end."""

    index: int  # the choice: prompt i's j-th sample is i * n + j
    text: str = ""
    token_id: int | None = None
    logprob: float | None = None
    top: dict[int, float] | None = None
    done: SequenceState | None = None  # the finished sequence, on the choice's last event
    prompt: PromptScores | None = None
    error: str | None = None


@dataclass
class Job:
    """One API request: prompts (ids), n samples each, one GenerationConfig; `emit` receives its events."""

    prompts: list[list[int]]
    config: GenerationConfig | None  # None: only score the prompts (echo with max_tokens 0)
    emit: Callable[[Event], None]
    n: int = 1
    prefix_len: int = 0  # leading tokens worth caching (a system prompt); 0 = none
    prompt_top: int | None = None  # score the prompts (echo + logprobs) with this many alternatives
    cancelled: bool = False
    cancelled_at_step: int = 0  # the scheduler's step count when the client left
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    _open: int = 0  # choices not finished yet

    @property
    def rows_needed(self) -> int:
        return 0 if self.config is None else len(self.prompts) * self.n


def prompt_logprobs(model: CausalLM, ids: list[int], top_n: int) -> PromptScores:
    """Score a prompt in one forward pass without the KV cache: log p(ids[i] | ids[:i]) and the top_n
    alternatives at every position, under the device's precision policy (as `lmstack eval` scores)."""
    device = model_device(model)
    tokens = torch.tensor([ids], device=device)  # (1, T)
    with torch.no_grad(), autocast(device, resolve_precision("auto", device)):
        logits = model(tokens).float()[0, :-1]  # (T-1, V): position i predicts token i + 1
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, tokens[0, 1:, None])[:, 0].tolist()
    top: list[dict[int, float] | None] = [None]
    if top_n > 0:
        values, top_ids = torch.topk(logp, min(top_n, logp.shape[-1]), dim=-1)  # (T-1, k)
        top += [dict(zip(i, v)) for i, v in zip(top_ids.tolist(), values.tolist())]
    else:
        top += [{} for _ in chosen]
    return PromptScores(list(ids), [None, *chosen], top)


class Scheduler:
    """The decode loop and its pool of `rows` x `row_len` KV slots. `start()` runs it on its own thread."""

    def __init__(self, model: CausalLM, tokenizer, rows: int, row_len: int, max_queue: int,
                 prefix_entries: int = 4, compile: bool = False, metrics: Metrics | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.rows, self.row_len, self.max_queue, self.compile = rows, row_len, max_queue, compile
        self.metrics = metrics or Metrics()
        self.prefixes = PrefixCache(prefix_entries)
        self.rows_used = 0  # written by the scheduler thread only
        self.steps = 0  # decode steps so far
        self.release_lags: list[int] = []  # per cancelled running job: steps between the cancel and its release
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._owner: dict[int, tuple[Job, int]] = {}  # row -> (job, choice index)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    # ------------------------------------------------------------------------------ web side
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._active)

    def submit(self, job: Job) -> None:
        """Queue `job`; raise QueueFull when max_queue requests wait already and it cannot start at once."""
        with self._cond:
            reserved = self.rows_used + sum(j.rows_needed for j in self._waiting)
            if len(self._waiting) >= self.max_queue and reserved + job.rows_needed > self.rows:
                with self.metrics.lock:
                    self.metrics.rejected += 1
                raise QueueFull(f"{len(self._waiting)} requests are waiting for KV memory (the limit, --max-queue)")
            job.submitted_at = time.perf_counter()
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client left: drop a waiting job now; a running one is released before the next step."""
        with self._cond:
            job.cancelled, job.cancelled_at_step = True, self.steps
            if job in self._waiting:
                self._waiting.remove(job)
                self.metrics.request_finished("cancelled")
            self._cond.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lmstack-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    # ------------------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            with ContinuousBatch(self.model, self.tokenizer, self.rows, self.row_len, self.compile) as batch:
                while True:
                    with self._cond:
                        while not (self._stopping or self._waiting or self._active):
                            self._cond.wait()
                        if self._stopping:
                            break
                    self._release_cancelled(batch)
                    self._admit(batch)
                    if batch.has_running():
                        self._dispatch(batch, batch.step())
                        self.steps += 1
        except BaseException as e:  # a bug: fail every job rather than hang its client
            self.failure = e
            for job in list(self._active) + list(self._waiting):
                for i in range(len(job.prompts) * job.n):
                    job.emit(Event(i, error=f"the scheduler stopped: {type(e).__name__}: {e}"))
            raise

    def _release_cancelled(self, batch: ContinuousBatch) -> None:
        for job in [j for j in self._active if j.cancelled]:
            for row in [r for r, (owner, _) in self._owner.items() if owner is job]:
                batch.release(row)
                del self._owner[row]
            self._active.remove(job)
            self.release_lags.append(self.steps - job.cancelled_at_step)
            self.metrics.request_finished("cancelled")
        self.rows_used = self.rows - len(batch.free_rows)

    def _admit(self, batch: ContinuousBatch) -> None:
        while True:
            with self._cond:
                if not self._waiting or self._waiting[0].rows_needed > len(batch.free_rows):
                    return
                job = self._waiting.popleft()
            try:
                self._start(batch, job)
            except LmstackError as e:  # validated by the app already; a last guard for the client
                for row in [r for r, (owner, _) in self._owner.items() if owner is job]:
                    batch.release(row)
                    del self._owner[row]
                if job in self._active:
                    self._active.remove(job)
                for i in range(len(job.prompts) * job.n):
                    job.emit(Event(i, error=str(e)))
                self.metrics.request_finished("error")
            self.rows_used = self.rows - len(batch.free_rows)

    def _start(self, batch: ContinuousBatch, job: Job) -> None:
        with self.metrics.lock:
            self.metrics.prompt_tokens += sum(len(p) for p in job.prompts)
        if job.prompt_top is not None:
            for i, prompt in enumerate(job.prompts):
                scores = prompt_logprobs(self.model, prompt, job.prompt_top)
                for j in range(job.n):
                    job.emit(Event(i * job.n + j, prompt=scores))
        if job.config is None:  # scoring only: every choice ends here
            for i in range(len(job.prompts) * job.n):
                done = SequenceState(None, job.prompts[i // job.n], set(), (), 1)
                done.finish_reason = "length"
                job.emit(Event(i, done=done))
            self.metrics.request_finished("length")
            return
        self._active.append(job)
        job._open = len(job.prompts) * job.n
        for i, prompt in enumerate(job.prompts):
            prefix = self.prefixes.lookup(prompt)
            rows = batch.add_group([prompt] * job.n, job.config, prefix=prefix)
            for j, row in enumerate(rows):
                self._owner[row] = (job, i * job.n + j)
            if job.prefix_len:
                cached = prefix is not None and prefix[0][0].shape[1] >= job.prefix_len
                with self.metrics.lock:
                    if cached:
                        self.metrics.prefix_hits += 1
                    else:
                        self.metrics.prefix_misses += 1
                if not cached and self.prefixes.wants(prompt[:job.prefix_len]):
                    self.prefixes.insert(prompt[:job.prefix_len], batch.session.read_slots(rows[0], job.prefix_len))

    def _dispatch(self, batch: ContinuousBatch, events: list) -> None:
        now, generated = time.perf_counter(), 0
        for event in events:
            job, index = self._owner[event.row]
            sequence = batch.sequence(event.row)
            if event.token_id is not None:
                generated += 1
                if job.first_token_at is None:
                    job.first_token_at = now
                    with self.metrics.lock:
                        self.metrics.ttft.observe(now - job.submitted_at)
            logprob = sequence.logprobs[-1] if sequence.logprobs else None
            top = sequence.top_logprobs[-1] if sequence.top_logprobs else None
            job.emit(Event(index, event.text, event.token_id, logprob, top,
                           done=sequence if event.finished else None))
            if event.finished:
                batch.release(event.row)
                del self._owner[event.row]
                job._open -= 1
                if job._open == 0:
                    self._active.remove(job)
                    self.metrics.request_finished("length" if sequence.finish_reason == "length" else "stop")
        self.metrics.tokens_generated(generated)
        self.rows_used = self.rows - len(batch.free_rows)
