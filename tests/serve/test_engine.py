"""The engine process (the model and scheduler in a process of their own): if it dies, requests in flight end
with OpenAI's error JSON and later ones get 503, never a hang; if it cannot load the model, /health and the API
say why with 503."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")

LONG = {"prompt": "hi", "max_tokens": 240, "ignore_eos": True, "temperature": 0}


def test_the_server_runs_its_model_in_another_process(start_server):
    live = start_server(engine="process")
    engine = live.scheduler
    assert engine.process.pid != os.getpid() and engine.process.is_alive()
    body = httpx.post(live.url + "/v1/completions", json={**LONG, "max_tokens": 3}, timeout=60).json()
    assert body["usage"]["completion_tokens"] == 3 and engine.steps >= 3


def test_a_dead_engine_ends_requests_with_errors_and_then_503(start_server):
    live = start_server(engine="process")
    pid = live.scheduler.process.pid
    answers = {}
    waiting = threading.Thread(target=lambda: answers.update(plain=httpx.post(
        live.url + "/v1/completions", json=LONG, timeout=60)))
    with httpx.stream("POST", live.url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as stream:
        lines = stream.iter_lines()
        next(lines)  # a first token: the engine runs it
        waiting.start()
        deadline = time.monotonic() + 10
        while live.scheduler.running < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]  # the stream ends: no hang
    error = json.loads(rest[-1][len("data: "):])["error"]
    assert "model process stopped" in error["message"] and error["type"] == "server_error"
    waiting.join(30)
    assert answers["plain"].status_code == 500 and "model process stopped" in answers["plain"].json()["error"]["message"]
    after = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
    assert after.status_code == 503 and "exit code" in after.json()["error"]["message"]
    assert httpx.get(live.url + "/health").status_code == 503


def test_a_model_the_engine_cannot_load_is_a_503_with_the_reason(start_server, tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"  # the tokenizer (which this process loads) but a broken model (the engine's)
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text("{not json")
    live = start_server(model=str(broken), engine="process", wait=False)
    deadline = time.monotonic() + 60
    while True:  # uvicorn starting, then the engine failing
        try:
            health = httpx.get(live.url + "/health")
            if health.json().get("detail") != "loading":
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert health.status_code == 503 and "config.json" in health.json()["detail"]
    error = httpx.post(live.url + "/v1/completions", json={"prompt": "hi"}).json()["error"]
    assert "loading the model failed" in error["message"] and "config.json" in error["message"]


def test_the_engine_process_keeps_the_schedulers_promises(start_server):
    """Through the pipe as on a thread: a client that leaves frees its row within one step, and a full queue
    answers 429 while the waiting request still runs."""
    live = start_server(engine="process", max_batch=1, max_queue=1)
    engine = live.scheduler
    with httpx.stream("POST", live.url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as first:
        lines = first.iter_lines()
        next(lines)
        waiting = {}
        second = threading.Thread(target=lambda: waiting.update(r=httpx.post(
            live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)))
        second.start()
        deadline = time.monotonic() + 10
        while engine.waiting < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        full = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=10)
        assert full.status_code == 429 and full.json()["error"]["code"] == "rate_limit_exceeded"
    second.join(30)
    assert waiting["r"].status_code == 200 and waiting["r"].json()["usage"]["completion_tokens"] == 3
    deadline = time.monotonic() + 10
    while engine.rows_used or not engine.release_lags:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert engine.release_lags[-1] <= 1
