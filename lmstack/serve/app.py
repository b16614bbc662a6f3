"""The FastAPI app: OpenAI's routes over one Scheduler, the metrics, and the chat page.

    GET  /health, /metrics, /v1/models, / (the chat page), /static/*
    POST /v1/completions, /v1/chat/completions   (stream: server-sent events ending in `data: [DONE]`)

The model loads after the server starts, so /health and the API answer 503 until it is ready. By default the
scheduler runs on a thread of this process; with `engine: process` (and no `loader`, which returns a model already
in memory) the model loads in an engine process of its own (lmstack.serve.engine), which runs the scheduler, while
this process serves HTTP and tokenizes.
A handler validates the body (400 with OpenAI's error JSON), encodes the prompt, and submits a Job: a full
queue answers 429. Events come back from the scheduler thread through an asyncio queue per request: the
scheduler hands each step's events of all requests to the event loop at once (call_soon_threadsafe). A client that
disconnects has its job cancelled: Starlette cancels a stream's generator (its `finally` cancels the job),
and a non-streaming handler watches `receive()` for `http.disconnect` itself, since Starlette does not.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from lmstack.generate.config import GenerationConfig
from lmstack.serve import routes
from lmstack.serve.config import ServeConfig
from lmstack.serve.engine import EngineProcess, LoadFailed, ModelInfo, build_scheduler, load_from_config
from lmstack.serve.metrics import Metrics
from lmstack.serve.protocol import APIError, Sampling
from lmstack.serve.responses import TokenText
from lmstack.serve.scheduler import Event, Job, QueueFull, Scheduler

# Markers that end an assistant turn in the common chat templates (ChatML, Llama 3, Phi, SentencePiece);
# the same list as `lmstack chat` (lmstack.cli.chat), which this layer cannot import.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>")
STATIC = resources.files("lmstack.serve") / "static"
Loader = Callable[[], tuple[Any, Any]]


class Server:
    """The tokenizer, the model's limits and the scheduler (or the engine process) once loaded, and what the
    routes share."""

    def __init__(self, config: ServeConfig, loader: Loader | None):
        """loader: returns (model, tokenizer) in this process, whose scheduler then runs on a thread; None: load
        config.model, here or (config.engine "process") in an engine process."""
        self.config, self.loader = config, loader
        self.name = config.model_name or Path(config.model).name or "model"
        self.metrics = Metrics()
        self.scheduler: Scheduler | EngineProcess | None = None
        self.load_error: str | None = None
        self.tokenizer = None
        self.info: ModelInfo | None = None  # the model's vocabulary, context, EOS ids and the rows' length
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's event loop, where jobs' events go
        self.created = int(time.time())

    def load(self) -> None:
        handoff = self.loop.call_soon_threadsafe if self.loop else None
        engine = None
        try:
            if self.loader is None and self.config.engine == "process":
                from lmstack.tokenizer import Tokenizer

                engine = EngineProcess(self.config, self.metrics, handoff)  # loads the model meanwhile
                self.tokenizer = Tokenizer.load(self.config.model)
                self.info = engine.wait_ready()
                scheduler = engine
            else:
                model, self.tokenizer = (self.loader or (lambda: load_from_config(self.config)))()
                scheduler, self.info = build_scheduler(model, self.tokenizer, self.config, self.config.max_queue,
                                                       self.metrics, handoff)
                scheduler.start()
            self.names = TokenText(self.tokenizer)
            self.scheduler = scheduler
        except Exception as e:  # shown by /health and every request
            self.load_error = str(e) if isinstance(e, LoadFailed) else f"{type(e).__name__}: {e}"
            if engine is not None:
                engine.stop()
            if isinstance(e, LoadFailed):  # the engine's error, whose traceback is in another process
                print(f"lmstack serve: loading the model failed: {e}", file=sys.stderr)
                return
            raise

    def ready(self) -> Scheduler | EngineProcess:
        if self.scheduler is None:
            reason = f"loading the model failed: {self.load_error}" if self.load_error else "the model is loading"
            raise APIError(503, f"{reason}; retry shortly" if not self.load_error else reason)
        if self.scheduler.failure is not None:
            raise APIError(503, f"the scheduler stopped: {self.scheduler.failure}")
        return self.scheduler

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.name}'",
                           "model", "model_not_found")

    # ------------------------------------------------------------------------------ prompts
    def encode(self, prompt: str | list[int], index: int) -> list[int]:
        vocab = self.info.vocab_size
        ids = self.tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, f"prompt {index} encodes to no tokens: give some text", "prompt")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt {index} holds token id {bad}, outside the vocabulary (size {vocab})", "prompt")
        return ids

    def max_tokens(self, ids: list[int], requested: int | None, param: str) -> int:
        """The completion's length: as requested (checked against the row), or what the row has left."""
        limit = self.info.row_len if requested != 0 else self.info.max_seq_len
        wanted = limit - len(ids) if requested is None else requested
        if len(ids) + max(wanted, 1 if requested != 0 else 0) > limit:
            asked = len(ids) + (requested or 0)
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{asked} tokens ({len(ids)} in the prompt, {requested or 0} for the completion). "
                                f"Please reduce the prompt or '{param}'.", param, "context_length_exceeded")
        return wanted

    def generation_config(self, s: Sampling, max_tokens: int, logprobs: bool, top: int,
                          eos_token_ids: list[int] | None = None) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=max_tokens, temperature=s.temperature, top_p=max(s.top_p, 1e-6),
                                top_k=s.top_k, min_p=s.min_p, repetition_penalty=s.repetition_penalty,
                                presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                                seed=s.seed, stop=s.stop, ignore_eos=s.ignore_eos, logprobs=logprobs,
                                top_logprobs=top, eos_token_ids=eos_token_ids)

    def chat_prompt(self, messages: list[dict[str, str]]) -> tuple[list[int], int]:
        """The rendered conversation's ids, and how many leading ids are the system message alone (0 if the
        template's rendering of it is not a prefix of the whole)."""
        from lmstack.errors import LmstackError

        tok = self.tokenizer
        if tok.chat_template is None:
            raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions", "messages")
        try:
            # Without special tokens, as apply_chat_template(tokenize=True): the template writes them.
            ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
            prefix = 0
            if messages[0]["role"] == "system" and len(messages) > 1:
                system = tok.encode(tok.apply_chat_template(messages[:1]), add_special_tokens=False)
                prefix = len(system) if ids[:len(system)] == system else 0
        except LmstackError as e:
            raise APIError(400, f"cannot render the messages with the chat template: {e}", "messages") from None
        return ids, prefix

    def chat_eos(self) -> list[int]:
        ids = {self.tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS} | {self.tokenizer.eos_token_id}
        ids |= set(self.info.eos_token_ids)
        return sorted(i for i in ids if i is not None)

    # ------------------------------------------------------------------------------ running a job
    def submit(self, job: Job) -> None:
        try:
            self.ready().submit(job)
        except QueueFull as e:
            raise APIError(429, f"The server is busy: {e}. Retry later.", None, "rate_limit_exceeded") from None

    async def collect(self, request: Request, job: Job, queue: asyncio.Queue) -> dict[int, list[Event]]:
        """Every event of a non-streaming job, by choice; cancels the job if the client disconnects first."""
        self.submit(job)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, self.scheduler, job))
        events: dict[int, list[Event]] = {}
        open_choices = len(job.prompts) * job.n
        try:
            while open_choices:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():  # the client left and the job is cancelled: nobody to answer
                    getter.cancel()
                    raise APIError(499, "the client closed the request")
                for event in getter.result():
                    if event.error:
                        raise APIError(500, event.error)
                    events.setdefault(event.index, []).append(event)
                    open_choices -= event.done is not None
        finally:
            watcher.cancel()
            if open_choices:
                self.scheduler.cancel(job)
        return events


class RequireKey:
    """`Authorization: Bearer KEY` on /v1/*, else 401. A plain ASGI middleware: Starlette's `@app.middleware`
    (BaseHTTPMiddleware) passes every streamed chunk through an extra task and memory stream."""

    def __init__(self, app: Any, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "Incorrect API key provided: send 'Authorization: Bearer KEY' with the key the "
                                      "server was started with (--api-key)", None, "invalid_api_key")
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _cancel_on_disconnect(request: Request, scheduler: Scheduler | EngineProcess, job: Job) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            scheduler.cancel(job)
            return


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


def create_app(config: ServeConfig, loader: Loader | None = None) -> FastAPI:
    """The app for `config`; `loader` returns (model, tokenizer) in this process (default: an engine process
    loads config.model)."""
    server = Server(config, loader)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.loop = asyncio.get_running_loop()
        threading.Thread(target=server.load, name="lmstack-load", daemon=True).start()
        yield
        if server.scheduler is not None:
            server.scheduler.stop()

    app = FastAPI(title="lmstack", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    if config.api_key:
        app.add_middleware(RequireKey, key=config.api_key)

    @app.get("/health")
    async def health() -> JSONResponse:
        if server.scheduler is None or server.scheduler.failure is not None:
            error = server.load_error or (server.scheduler and str(server.scheduler.failure)) or "loading"
            return JSONResponse({"status": "unavailable", "detail": error}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        s = server.scheduler
        text = server.metrics.render(s.running if s else 0, s.waiting if s else 0, s.rows_used if s else 0,
                                     s.rows if s else config.max_batch)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        kinds = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
        resource = STATIC / name
        if "/" in name or not resource.is_file():
            return JSONResponse(APIError(404, f"no static file {name!r}").body(), status_code=404)
        return Response(resource.read_text(encoding="utf-8"), media_type=kinds.get(Path(name).suffix, "text/plain"))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        scheduler = server.ready()
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "lmstack", "max_model_len": scheduler.row_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await routes.completions(server, request, await _json(request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await routes.chat(server, request, await _json(request))

    return app
