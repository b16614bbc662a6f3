"""The model and its scheduler in a process of their own, so that the web side does not share their GIL.

    engine = EngineProcess(config, metrics, handoff=loop.call_soon_threadsafe)   # spawns; the child loads
    info = engine.wait_ready()     # the model's vocabulary, context and EOS ids (raises LoadFailed)
    engine.submit(job)             # as Scheduler.submit: QueueFull past max_queue waiting requests (-> 429)
    engine.cancel(job)             # the client left: the engine releases its rows before its next step

With the scheduler on a thread of the web process, every step of the model waited for the event loop's
Python (writing chunks, parsing requests) and the other way round: one GIL for both. Here the web process
(uvicorn, FastAPI, tokenizing prompts, formatting chunks) and the engine process (the Scheduler and its
ContinuousBatch, detokenising as it samples, since stop strings are matched on text) run on two cores.
It is not the default (`lmstack serve --engine process`): on a 2-core machine that other jobs keep busy, waking
the other process every step cost more than the shared GIL did (README, section serve: the A/B).

Messages are JSON over a pipe, one per scheduler pass, not per token:
    web -> engine: {"submit": job}, {"cancel": id}, {"stop": true}
    engine -> web: {"ready": info} or {"load_error": why} once; then per pass {"events": [[id, [event]]],
                   "left": [ids cancelled and released], "state": gauges, "metrics": counters};
                   {"failure": why} if the loop dies
The web process mirrors the gauges (rows used, waiting, running, steps, release lags) from the last report, and
decides 429s itself from the jobs it has in flight (the same rule as Scheduler.submit), so that a full queue
is answered at once. If the engine process dies, every request in flight gets an error event and the server
answers 503 from then on: nothing waits on a process that is gone.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from lmstack.serve.config import ServeConfig
from lmstack.serve.metrics import Metrics
from lmstack.serve.scheduler import Event, Job, PromptScores, QueueFull, Scheduler, hand_over


def load_from_config(config: ServeConfig) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from the configured directory (with the adapter, when given)."""
    from lmstack.errors import CheckpointError
    from lmstack.interop.hf import load_model
    from lmstack.tokenizer import Tokenizer

    path = Path(config.model)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model directory (--model)")
    return load_model(path, device=config.device, adapter=config.adapter).eval(), Tokenizer.load(path)


@dataclass
class ModelInfo:
    """What the web side needs to know of the model: validation limits and the end-of-sequence ids."""

    vocab_size: int
    max_seq_len: int
    eos_token_ids: list[int]
    row_len: int  # KV slots per row: the longest prompt + completion served


def build_scheduler(model: Any, tokenizer: Any, config: ServeConfig, max_queue: int, metrics: Metrics | None = None,
                    handoff: Callable[[Callable[[], None]], None] | None = None) -> tuple[Scheduler, ModelInfo]:
    """The Scheduler `config` asks for over a loaded model (rows of max_len, at most the model's context), and what
    the web side needs to know of the model."""
    context = model.config.max_seq_len
    row_len = min(config.max_len or context, context)
    scheduler = Scheduler(model, tokenizer, config.max_batch, row_len, max_queue, config.prefix_cache, config.compile,
                          metrics, handoff, config.batch_wait_ms / 1e3)
    return scheduler, ModelInfo(model.config.vocab_size, context, list(model.config.eos_token_ids), row_len)


@dataclass
class Finished:
    """A choice's whole sequence on its last event, as the routes read a SequenceState."""

    ids: list[int]
    text: str
    logprobs: list[float]
    top_logprobs: list[dict[int, float]]
    finish_reason: str


class LoadFailed(Exception):
    """The engine process could not load the model."""


# ------------------------------------------------------------------------------------------- messages


def _keys_to_int(top: dict[str, float] | None) -> dict[int, float] | None:
    """JSON writes a dict's int keys (token ids) as strings."""
    return None if top is None else {int(k): v for k, v in top.items()}


def event_message(event: Event) -> dict[str, Any]:
    out: dict[str, Any] = {"index": event.index, "text": event.text, "token_id": event.token_id,
                           "logprob": event.logprob, "top": event.top, "error": event.error}
    if event.done is not None:
        d = event.done
        out["done"] = [d.ids, d.text, d.logprobs, d.top_logprobs, d.finish_reason]
    if event.prompt is not None:
        out["prompt"] = [event.prompt.ids, event.prompt.logprobs, event.prompt.top]
    return out


def event_from(message: dict[str, Any]) -> Event:
    done = prompt = None
    if "done" in message:
        ids, text, logprobs, tops, reason = message["done"]
        done = Finished(ids, text, logprobs, [_keys_to_int(t) for t in tops], reason)
    if "prompt" in message:
        ids, logprobs, tops = message["prompt"]
        prompt = PromptScores(ids, logprobs, [_keys_to_int(t) for t in tops])
    return Event(message["index"], message["text"], message["token_id"], message["logprob"],
                 _keys_to_int(message["top"]), done, prompt, message["error"])


def _send(conn: Connection, lock: threading.Lock, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    with lock:
        conn.send_bytes(data)


# ------------------------------------------------------------------------------------------- the engine process


def engine_main(conn: Connection, spec: dict[str, Any]) -> None:
    """The engine process: load the model, then run the scheduler's loop on this thread while another thread
    reads the web process's messages. Exits when told to stop or when the web process goes away."""
    import torch

    from lmstack.generate.config import GenerationConfig

    torch.set_num_threads(spec["threads"])
    config, lock = ServeConfig(**spec["config"]), threading.Lock()
    try:
        model, tokenizer = load_from_config(config)
        # No queue limit here: the web process refuses past max_queue before a job is sent.
        scheduler, info = build_scheduler(model, tokenizer, config, sys.maxsize)
    except Exception as e:  # shown by /health and every request
        _send(conn, lock, {"load_error": f"{type(e).__name__}: {e}"})
        return
    jobs: dict[int, Job] = {}  # by id: those not finished yet
    outbox: list[list[Any]] = []  # [job id, [event message]] since the last report

    def emitter(job_id: int, choices: int) -> Callable[[list[Event]], None]:
        open_choices = [choices]

        def emit(events: list[Event]) -> None:
            outbox.append([job_id, [event_message(e) for e in events]])
            open_choices[0] -= sum(e.done is not None or e.error is not None for e in events)
            if open_choices[0] <= 0:
                jobs.pop(job_id, None)

        return emit

    def report(left: list[Job], events: list[list[Any]] | None = None) -> None:
        nonlocal outbox
        if events is None:
            events, outbox = outbox, []
        for job in left:
            jobs.pop(job.id, None)
        state = {"rows_used": scheduler.rows_used, "waiting": scheduler.waiting, "running": scheduler.running,
                 "steps": scheduler.steps, "lags": [job.release_lag for job in left if job.release_lag is not None],
                 "prefix_entries": len(scheduler.prefixes)}
        _send(conn, lock, {"events": events, "left": [job.id for job in left], "state": state,
                           "metrics": scheduler.metrics.engine_state()})

    def submit(m: dict[str, Any]) -> None:
        try:
            generation = None if m["config"] is None else GenerationConfig(**m["config"])
            emit = emitter(m["id"], len(m["prompts"]) * m["n"])
            job = Job(m["prompts"], generation, emit, n=m["n"], prefix_len=m["prefix_len"],
                      prompt_top=m["prompt_top"], id=m["id"])
        except Exception as e:  # validated by the web process already: a bug, which fails this request only
            errors = [event_message(Event(i, error=f"{type(e).__name__}: {e}"))
                      for i in range(len(m["prompts"]) * m["n"])]
            report([], [[m["id"], errors]])
            return
        jobs[job.id] = job
        scheduler.submit(job)

    def read() -> None:
        while True:
            try:
                message = json.loads(conn.recv_bytes())
            except (EOFError, OSError):  # the web process is gone
                message = {"stop": True}
            if "submit" in message:
                submit(message["submit"])
            elif "cancel" in message and message["cancel"] in jobs:
                scheduler.cancel(jobs[message["cancel"]])
            elif "stop" in message:
                scheduler.stop()  # the loop runs on the main thread: this only tells it to end
                return

    _send(conn, lock, {"ready": asdict(info)})
    scheduler.report = report
    threading.Thread(target=read, name="lmstack-engine-reader", daemon=True).start()
    try:
        scheduler.run()
    except BaseException as e:
        _send(conn, lock, {"failure": f"{type(e).__name__}: {e}"})


# ------------------------------------------------------------------------------------------- the web side


@dataclass
class _InFlight:
    job: Job
    open: int  # choices without their last event yet
    started: bool = False  # the engine admitted it (its first events came)


class EngineProcess:
    """The web process's handle on the engine process: what the app and the routes call on a Scheduler."""

    def __init__(self, config: ServeConfig, metrics: Metrics,
                 handoff: Callable[[Callable[[], None]], None] | None = None):
        """Spawn the engine, which starts loading the model. handoff(fn) runs fn where the jobs' `emit` lives
        (an event loop's call_soon_threadsafe); by default the reading thread calls it."""
        import torch

        self.metrics, self.handoff = metrics, handoff
        self.rows, self.max_queue = config.max_batch, config.max_queue
        # the engine's gauges as of its last report
        self.rows_used = self.waiting = self.running = self.steps = self.prefix_entries = 0
        self.release_lags: deque[int] = deque(maxlen=1024)
        self.failure: str | None = None
        self.info: ModelInfo | None = None
        self._stopping = False  # stop() was called: the pipe's end is expected
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or CUDA state
        self._conn, child = context.Pipe()
        spec = {"config": asdict(config), "threads": torch.get_num_threads()}
        self.process = context.Process(target=engine_main, args=(child, spec), name="lmstack-engine", daemon=True)
        self.process.start()
        child.close()
        self._lock = threading.Lock()  # the jobs in flight, and the pipe's writing end
        self._in_flight: dict[int, _InFlight] = {}
        self._ids = itertools.count(1)
        self._reader: threading.Thread | None = None

    @property
    def row_len(self) -> int:
        return self.info.row_len

    def wait_ready(self) -> ModelInfo:
        """Block until the engine has loaded the model; then start reading its reports."""
        try:
            message = json.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            raise LoadFailed(f"the engine process exited while loading (exit code {self.process.exitcode})") from None
        if "load_error" in message:
            self.process.join(10)
            raise LoadFailed(message["load_error"])
        self.info = ModelInfo(**message["ready"])
        self._reader = threading.Thread(target=self._read, name="lmstack-engine-link", daemon=True)
        self._reader.start()
        return self.info

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.failure is not None:  # died since the app checked: the request fails as those in flight did
                self._deliver([(job, job.error_events(f"the model process stopped: {self.failure}"))])
                return
            waiting = sum(not f.started for f in self._in_flight.values())
            reserved = sum(f.job.rows_needed for f in self._in_flight.values())
            if waiting >= self.max_queue and reserved + job.rows_needed > self.rows:
                with self.metrics.lock:
                    self.metrics.rejected += 1
                raise QueueFull(f"{waiting} requests are waiting for KV memory (the limit, --max-queue)")
            job.id = next(self._ids)
            self._in_flight[job.id] = _InFlight(job, job.choices)
            config = None if job.config is None else asdict(job.config)
            self._write({"submit": {"id": job.id, "prompts": job.prompts, "config": config, "n": job.n,
                                    "prefix_len": job.prefix_len, "prompt_top": job.prompt_top}})

    def cancel(self, job: Job) -> None:
        with self._lock:
            if job.id in self._in_flight and not job.cancelled:
                job.cancelled = True
                self._write({"cancel": job.id})

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._write({"stop": True})
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)

    def _write(self, message: dict[str, Any]) -> None:
        """Send a message (holding self._lock); a dead engine is noticed by the reader, not here."""
        try:
            self._conn.send_bytes(json.dumps(message).encode())
        except OSError:
            pass

    def _read(self) -> None:
        while True:
            try:
                message = json.loads(self._conn.recv_bytes())
            except (EOFError, OSError):
                if self._stopping:
                    return
                self.process.join(5)
                self._fail(f"the engine process exited (exit code {self.process.exitcode})")
                return
            if "failure" in message:
                self._fail(message["failure"])
                return
            self._apply(message)

    def _apply(self, message: dict[str, Any]) -> None:
        """One report: mirror the gauges and counters, then hand the events to the event loop at once."""
        state = message["state"]
        self.rows_used, self.waiting, self.running = state["rows_used"], state["waiting"], state["running"]
        self.steps, self.prefix_entries = state["steps"], state["prefix_entries"]
        self.release_lags.extend(state["lags"])
        self.metrics.load_engine_state(message["metrics"])
        deliveries, tokens = [], 0
        with self._lock:
            for job_id in message["left"]:
                self._in_flight.pop(job_id, None)
            for job_id, events in message["events"]:
                flight = self._in_flight.get(job_id)
                if flight is None:
                    continue
                flight.started = True
                events = [event_from(e) for e in events]
                for event in events:
                    tokens += event.token_id is not None
                    flight.open -= event.done is not None or event.error is not None
                if flight.open <= 0:
                    del self._in_flight[job_id]
                deliveries.append((flight.job, events))
        if tokens:
            self.metrics.tokens_generated(tokens)
        self._deliver(deliveries)

    def _fail(self, reason: str) -> None:
        """The engine is gone: every request in flight ends with an error; later ones get 503 (app.Server.ready)."""
        self.failure = reason
        with self._lock:
            flights, self._in_flight = list(self._in_flight.values()), {}
        self._deliver([(f.job, f.job.error_events(f"the model process stopped: {reason}")) for f in flights])

    def _deliver(self, deliveries: list[tuple[Job, list[Event]]]) -> None:
        if not deliveries:
            return
        try:
            hand_over(self.handoff, deliveries)
        except RuntimeError:  # the event loop has closed: the server is shutting down, nobody is waiting
            pass
