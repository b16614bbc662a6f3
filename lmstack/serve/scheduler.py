"""Continuous batching: one thread drives a ContinuousBatch step by step; requests join and leave it.

    scheduler = Scheduler(..., handoff=loop.call_soon_threadsafe)
    scheduler.submit(job)   # from the web handlers: queued, or QueueFull (-> 429)
    scheduler.cancel(job)   # the client went away: its rows are released before the next decode step
    job.emit(events)        # run through `handoff` (on the event loop): this job's events of one step, in order

The KV pool is the batch's R rows x S slots, allocated once: a request holds n rows (one per choice) from
admission to its last token, so memory never grows with load. A request that does not fit waits in a
bounded FIFO queue; past `max_queue` waiting requests `submit` refuses (the server answers 429). A
request's rows are released the step it finishes or is cancelled, and only this thread touches the model.

Each loop: release cancelled jobs, admit waiting jobs while rows are free (their prompts prefilled together in
one model call; a prompt with a cached prefix on its own, computing only the rest), then one decode step for
every running row, then one `handoff` carrying every job's events of the step. One hand-off per step, not per
token: each wakes the event loop through a pipe and contends for the GIL with the model's next step.
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
    emit: Callable[[list[Event]], None]  # called through the scheduler's handoff, with one step's events
    n: int = 1
    prefix_len: int = 0  # leading tokens worth caching (a system prompt); 0 = none
    prompt_top: int | None = None  # score the prompts (echo + logprobs) with this many alternatives
    id: int = 0  # its name in messages to and from an engine process (lmstack.serve.engine)
    release_lag: int | None = None  # cancelled while running: steps from the cancel to the release of its rows
    cancelled: bool = False
    cancelled_at_step: int = 0  # the scheduler's step count when the client left
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    _open: int = 0  # choices not finished yet

    @property
    def choices(self) -> int:
        """Sequences the request returns: n per prompt (each ends with a `done` or an `error` event)."""
        return len(self.prompts) * self.n

    @property
    def rows_needed(self) -> int:
        return 0 if self.config is None else self.choices

    def error_events(self, message: str) -> list[Event]:
        """One error event per choice: how a request fails as a whole."""
        return [Event(i, error=message) for i in range(self.choices)]


def hand_over(handoff: Callable[[Callable[[], None]], None] | None,
              deliveries: list[tuple[Job, list[Event]]]) -> None:
    """Give each job its events in one call where the jobs' consumers live: handoff(fn) runs fn there (an event
    loop's call_soon_threadsafe); without one, here."""

    def deliver() -> None:
        for job, events in deliveries:
            job.emit(events)

    if handoff is None:
        deliver()
    else:
        handoff(deliver)


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
                 prefix_entries: int = 4, compile: bool = False, metrics: Metrics | None = None,
                 handoff: Callable[[Callable[[], None]], None] | None = None, batch_wait: float = 0.0):
        """handoff(fn) runs fn where the jobs' consumers live (an event loop's call_soon_threadsafe); by
        default the scheduler thread calls `emit` itself. batch_wait: seconds a request that finds the pool
        idle waits for others arriving with it (`_gather_burst`); 0 = start at once."""
        self.model, self.tokenizer = model, tokenizer
        self.handoff = handoff
        self.rows, self.row_len, self.max_queue, self.compile = rows, row_len, max_queue, compile
        self.batch_wait = batch_wait
        self.metrics = metrics or Metrics()
        self.prefixes = PrefixCache(prefix_entries)
        self.rows_used = 0  # written by the scheduler thread only
        self.steps = 0  # decode steps so far
        # per cancelled running job (the last 1,024): steps between the cancel and its release
        self.release_lags: deque[int] = deque(maxlen=1024)
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._owner: dict[int, tuple[Job, int]] = {}  # row -> (job, choice index)
        self._outbox: dict[int, tuple[Job, list[Event]]] = {}  # id(job) -> its events since the last hand-off
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        # Called by the loop after every pass and before it idles, with the cancelled jobs released since
        # (an engine process reports its state to the web process through it; lmstack.serve.engine).
        self.report: Callable[[list[Job]], None] | None = None
        self._left: list[Job] = []

    # ------------------------------------------------------------------------------ web side
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def prefix_entries(self) -> int:
        return len(self.prefixes)

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
                self._left.append(job)
                self.metrics.request_finished("cancelled")
            self._cond.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="lmstack-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    # ------------------------------------------------------------------------------ the loop
    def run(self) -> None:
        """The loop, until `stop()` (on this thread: `start()` runs it on a new one)."""
        try:
            with ContinuousBatch(self.model, self.tokenizer, self.rows, self.row_len, self.compile) as batch:
                self.metrics.kv_pool_bytes = sum(c.k.nbytes + c.v.nbytes for c in batch.session.caches)
                clock = self.metrics.scheduler_seconds
                while True:
                    t0 = time.perf_counter()
                    with self._cond:
                        while not (self._stopping or self._waiting or self._active):
                            # Idle from t0 on: a /metrics scrape now counts the wait so far (idle_since), so
                            # that the idle time between two scrapes is the idle time within them.
                            self.metrics.idle_since = t0
                            self._report()
                            self._cond.wait()
                        if not self._active and self.batch_wait > 0:
                            self._gather_burst()
                        if self._stopping:
                            break
                    t1 = time.perf_counter()
                    clock["idle"] += t1 - t0
                    self.metrics.idle_since = None
                    self._release_cancelled(batch)
                    self._admit(batch)
                    t2 = time.perf_counter()
                    if batch.has_running():
                        events = batch.step()
                        t3 = time.perf_counter()
                        self._dispatch(batch, events)
                        self.steps += 1
                        self.metrics.decode_steps += 1
                        clock["step"] += t3 - t2
                    else:
                        t3 = t2
                    self._flush()
                    self._report()
                    clock["dispatch"] += time.perf_counter() - t3
                    clock["admit"] += t2 - t1
        except BaseException as e:  # a bug: fail every job rather than hang its client
            self.failure = e
            self._outbox.clear()
            for job in list(self._active) + list(self._waiting):
                for event in job.error_events(f"the scheduler stopped: {type(e).__name__}: {e}"):
                    self._send(job, event)
            self._flush()
            raise

    def _gather_burst(self) -> None:
        """The pool is idle and a request came (holding self._cond): wait while more keep coming, each within
        batch_wait of the last and 4 x batch_wait in all, until they would fill the pool. Clients that start
        together (a burst, or closed-loop clients whose requests ended in the same step) then share one prefill
        and decode in step, instead of the first one's rows running a step or two ahead, alone, and finishing
        alone. Triton's dynamic batcher has the same knob (max_queue_delay); a lone request pays up to
        batch_wait in time to first token."""
        deadline = time.perf_counter() + 4 * self.batch_wait
        seen = len(self._waiting)
        while not self._stopping and sum(job.rows_needed for job in self._waiting) < self.rows:
            remaining = min(self.batch_wait, deadline - time.perf_counter())
            if remaining <= 0 or not self._cond.wait(remaining) or len(self._waiting) == seen:
                return
            seen = len(self._waiting)

    def _report(self) -> None:
        if self.report is not None:
            left, self._left = self._left, []
            self.report(left)

    def _send(self, job: Job, event: Event) -> None:
        """Queue `event` for `job`; `_flush` hands everything queued over at once."""
        self._outbox.setdefault(id(job), (job, []))[1].append(event)

    def _flush(self) -> None:
        if not self._outbox:
            return
        batches = list(self._outbox.values())
        self._outbox = {}
        hand_over(self.handoff, batches)

    def _release_cancelled(self, batch: ContinuousBatch) -> None:
        for job in [j for j in self._active if j.cancelled]:
            for row in [r for r, (owner, _) in self._owner.items() if owner is job]:
                batch.release(row)
                del self._owner[row]
            self._active.remove(job)
            self._left.append(job)
            job.release_lag = self.steps - job.cancelled_at_step
            self.release_lags.append(job.release_lag)
            self.metrics.request_finished("cancelled")
        self.rows_used = self.rows - len(batch.free_rows)

    def _admit(self, batch: ContinuousBatch) -> None:
        """Start the waiting jobs that fit, in FIFO order, all in this step."""
        jobs, free = [], len(batch.free_rows)
        with self._cond:
            while self._waiting and self._waiting[0].rows_needed <= free:
                job = self._waiting.popleft()
                free -= job.rows_needed
                jobs.append(job)
        starting = []
        for job in jobs:
            try:
                if job.config is not None:
                    batch.check(job.prompts, job.config)  # validated by the app already; a last guard
                if self._score(job):
                    starting.append(job)
            except LmstackError as e:
                self._fail(batch, job, str(e))
        if starting:
            try:
                self._start(batch, starting)
            except LmstackError as e:  # not expected after the checks: fail the jobs rather than the server
                for job in starting:
                    self._fail(batch, job, str(e))
        self.rows_used = self.rows - len(batch.free_rows)

    def _fail(self, batch: ContinuousBatch, job: Job, message: str) -> None:
        for row in [r for r, (owner, _) in self._owner.items() if owner is job]:
            batch.release(row)
            del self._owner[row]
        if job in self._active:
            self._active.remove(job)
        for event in job.error_events(message):
            self._send(job, event)
        self.metrics.request_finished("error")

    def _score(self, job: Job) -> bool:
        """Echo's prompt scores first; False when that is the whole job (max_tokens 0), which ends here."""
        with self.metrics.lock:
            self.metrics.prompt_tokens += sum(len(p) for p in job.prompts)
        if job.prompt_top is not None:
            for i, prompt in enumerate(job.prompts):
                scores = prompt_logprobs(self.model, prompt, job.prompt_top)
                for j in range(job.n):
                    self._send(job, Event(i * job.n + j, prompt=scores))
        if job.config is not None:
            return True
        for i in range(job.choices):
            done = SequenceState(None, job.prompts[i // job.n], set(), (), 1)
            done.finish_reason = "length"
            self._send(job, Event(i, done=done))
        self.metrics.request_finished("length")
        return False

    def _start(self, batch: ContinuousBatch, jobs: list[Job]) -> None:
        """Put the jobs' prompts into rows: those with a cached prefix one by one (the prefix is written, the
        rest computed), all the others in one prefill."""
        plain: list[tuple[Job, int, list[int]]] = []  # (job, prompt index, prompt)
        for job in jobs:
            self._active.append(job)
            job._open = job.choices
            for i, prompt in enumerate(job.prompts):
                prefix = self.prefixes.lookup(prompt)
                if prefix is None:
                    plain.append((job, i, prompt))
                    continue
                rows = batch.add_group([prompt] * job.n, job.config, prefix=prefix)
                self._placed(batch, job, i, prompt, rows, prefix)
        if plain:
            groups = batch.add_groups([([prompt] * job.n, job.config) for job, _, prompt in plain])
            for (job, i, prompt), rows in zip(plain, groups):
                self._placed(batch, job, i, prompt, rows, None)

    def _placed(self, batch: ContinuousBatch, job: Job, i: int, prompt: list[int], rows: list[int],
                prefix: list | None) -> None:
        """Prompt i of `job` now holds `rows`: record their owner; count and fill the prefix cache."""
        for j, row in enumerate(rows):
            self._owner[row] = (job, i * job.n + j)
        if not job.prefix_len:
            return
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
            self._send(job, Event(index, event.text, event.token_id, logprob, top,
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
