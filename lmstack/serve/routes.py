"""The two generation routes: a request body in, a Job through the scheduler, OpenAI's body or stream out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lmstack.serve.protocol import APIError, ChatRequest, CompletionRequest
from lmstack.serve.responses import (
    FINISH,
    ChunkWriter,
    CompletionLogprobs,
    chat_body,
    chat_logprob_entry,
    completion_body,
    new_id,
    sse,
)
from lmstack.serve.scheduler import Event, Job

if TYPE_CHECKING:
    from lmstack.serve.app import Server


def _channel() -> tuple[asyncio.Queue, Callable[[list[Event]], None]]:
    """A queue of event lists on this event loop and the job's `emit`, which the scheduler's hand-off calls
    on this loop with each step's events."""
    queue: asyncio.Queue = asyncio.Queue()
    return queue, queue.put_nowait


def _streaming(server: Server, job: Job, body: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events; if the client leaves (Starlette cancels the generator) the job is cancelled."""

    async def guarded() -> AsyncIterator[str]:
        completed = False
        try:
            async for piece in body:
                yield piece
            completed = True
        finally:
            if not completed:
                server.scheduler.cancel(job)

    server.submit(job)  # before the response starts, so that a full queue is still a 429 status
    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _error_chunk(message: str) -> str:
    return sse(APIError(500, message).body())


# ------------------------------------------------------------------------------------------- completions


async def completions(server: Server, request: Request, body: Any) -> Response:
    req = CompletionRequest.parse(body)
    server.ready()
    server.check_model(req.model)
    s = req.sampling
    prompts = [server.encode(p, i) for i, p in enumerate(req.prompts)]
    max_tokens = min(server.max_tokens(ids, s.max_tokens, "max_tokens") for ids in prompts)
    config = None
    if max_tokens > 0:
        config = server.generation_config(s, max_tokens, req.logprobs is not None, req.logprobs or 0)
    queue, emit = _channel()
    job = Job(prompts, config, emit, n=s.n, prompt_top=req.logprobs if req.echo and req.logprobs is not None else None)
    prompt_texts = [p if isinstance(p, str) else server.tokenizer.decode(p) for p in req.prompts] if req.echo else None
    if s.stream:
        return _streaming(server, job, _completion_stream(server, req, job, queue, prompt_texts))
    events = await server.collect(request, job, queue)
    choices, completion_tokens = [], 0
    for index in range(len(prompts) * s.n):
        choice_events = events[index]
        done = choice_events[-1].done
        completion_tokens += len(done.ids) if config is not None else 0
        text = (prompt_texts[index // s.n] if req.echo else "") + (done.text if config is not None else "")
        logprobs = None
        if req.logprobs is not None:
            record = CompletionLogprobs(server.names)
            scores = next((e.prompt for e in choice_events if e.prompt is not None), None)
            if scores is not None:
                for token_id, value, top in zip(scores.ids, scores.logprobs, scores.top):
                    record.add(token_id, value, top)
            if config is not None:
                tops = done.top_logprobs or [None] * len(done.ids)
                for token_id, value, top in zip(done.ids, done.logprobs, tops):
                    record.add(token_id, value, top)
            logprobs = record.body()
        choices.append({"index": index, "text": text, "logprobs": logprobs,
                        "finish_reason": FINISH[done.finish_reason]})
    body = completion_body(new_id("cmpl"), server.name, int(time.time()), choices,
                           sum(len(p) for p in prompts), completion_tokens)
    return JSONResponse(body)


async def _completion_stream(server: Server, req: CompletionRequest, job: Job, queue: asyncio.Queue,
                             prompt_texts: list[str] | None) -> AsyncIterator[str]:
    n, writer = req.sampling.n, ChunkWriter("completion", server.name, req.sampling.include_usage)
    total = len(job.prompts) * n
    records = [CompletionLogprobs(server.names) for _ in range(total)]
    sent = [0] * total  # logprob entries already streamed, per choice
    if prompt_texts is not None and req.logprobs is None:
        yield writer.chunk([{"index": i, "text": prompt_texts[i // n], "logprobs": None, "finish_reason": None}
                            for i in range(total)])
    completion_tokens, open_choices = 0, total
    while open_choices:
        out = []  # this step's chunks, written at once
        for event in await queue.get():
            if event.error:
                yield "".join(out) + _error_chunk(event.error)
                return
            record = records[event.index]
            if event.prompt is not None:  # echo with logprobs: the prompt and its scores first
                for token_id, value, top in zip(event.prompt.ids, event.prompt.logprobs, event.prompt.top):
                    record.add(token_id, value, top)
                text = prompt_texts[event.index // n]
            else:
                text = event.text
                if event.token_id is not None:
                    completion_tokens += 1
                    if req.logprobs is not None:
                        record.add(event.token_id, event.logprob, event.top)
            finish = FINISH[event.done.finish_reason] if event.done is not None else None
            if text or finish:
                logprobs = record.body(sent[event.index]) if req.logprobs is not None else None
                sent[event.index] = len(record.tokens)
                out.append(writer.chunk([{"index": event.index, "text": text, "logprobs": logprobs,
                                          "finish_reason": finish}]))
            open_choices -= event.done is not None
        if out:
            yield "".join(out)
    if writer.include_usage:
        yield writer.usage_chunk(sum(len(p) for p in job.prompts), completion_tokens)
    yield sse("[DONE]")


# ------------------------------------------------------------------------------------------- chat


async def chat(server: Server, request: Request, body: Any) -> Response:
    req = ChatRequest.parse(body)
    server.ready()
    server.check_model(req.model)
    s = req.sampling
    ids, prefix_len = server.chat_prompt(req.messages)
    param = "max_completion_tokens" if isinstance(body, dict) and "max_completion_tokens" in body else "max_tokens"
    max_tokens = server.max_tokens(ids, s.max_tokens, param)
    config = server.generation_config(s, max_tokens, req.logprobs, req.top_logprobs, server.chat_eos())
    queue, emit = _channel()
    job = Job([ids], config, emit, n=s.n, prefix_len=prefix_len)
    if s.stream:
        return _streaming(server, job, _chat_stream(server, req, job, queue))
    events = await server.collect(request, job, queue)
    choices, completion_tokens = [], 0
    for index in range(s.n):
        done = events[index][-1].done
        completion_tokens += len(done.ids)
        logprobs = None
        if req.logprobs:
            tops = done.top_logprobs or [None] * len(done.ids)
            logprobs = {"content": [chat_logprob_entry(server.names, t, v, top)
                                    for t, v, top in zip(done.ids, done.logprobs, tops)]}
        choices.append({"index": index, "message": {"role": "assistant", "content": done.text},
                        "logprobs": logprobs, "finish_reason": FINISH[done.finish_reason]})
    return JSONResponse(chat_body(new_id("chatcmpl"), server.name, int(time.time()), choices, len(ids),
                                  completion_tokens))


async def _chat_stream(server: Server, req: ChatRequest, job: Job, queue: asyncio.Queue) -> AsyncIterator[str]:
    n, writer = req.sampling.n, ChunkWriter("chat", server.name, req.sampling.include_usage)
    # the role first, for every choice, before any content
    yield writer.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None} for i in range(n)])
    pending: list[list[dict[str, Any]]] = [[] for _ in range(n)]  # logprob entries not streamed yet
    completion_tokens, open_choices = 0, n
    while open_choices:
        out = []  # this step's chunks, written at once
        for event in await queue.get():
            if event.error:
                yield "".join(out) + _error_chunk(event.error)
                return
            if event.token_id is not None:
                completion_tokens += 1
                if req.logprobs:
                    pending[event.index].append(chat_logprob_entry(server.names, event.token_id, event.logprob,
                                                                   event.top))
            if event.text:
                logprobs = {"content": pending[event.index]} if req.logprobs else None
                pending[event.index] = []
                out.append(writer.chunk([{"index": event.index, "delta": {"content": event.text},
                                          "logprobs": logprobs, "finish_reason": None}]))
            if event.done is not None:
                logprobs = {"content": pending[event.index]} if req.logprobs and pending[event.index] else None
                out.append(writer.chunk([{"index": event.index, "delta": {}, "logprobs": logprobs,
                                          "finish_reason": FINISH[event.done.finish_reason]}]))
                open_choices -= 1
        if out:
            yield "".join(out)
    if writer.include_usage:
        yield writer.usage_chunk(len(job.prompts[0]), completion_tokens)
    yield sse("[DONE]")
