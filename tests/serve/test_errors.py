"""OpenAI error bodies and statuses (400, 401, 404, 429, 503), and a full queue that answers 429 without
touching the running requests."""

from __future__ import annotations

import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


def client(server, api_key="none"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_400_bodies_name_the_field(server):
    url = server.url + "/v1/completions"
    error = error_of(httpx.post(url, json={"prompt": "hi", "temperature": -1}), 400)
    assert error["param"] == "temperature" and "-1" in error["message"] and error["type"] == "invalid_request_error"
    assert error_of(httpx.post(url, json={"prompt": "hi", "tempreature": 1}), 400)["param"] == "tempreature"
    assert "prompt" in error_of(httpx.post(url, json={"max_tokens": 3}), 400)["message"]
    assert "JSON" in error_of(httpx.post(url, content=b"{not json"), 400)["message"]
    assert "vocabulary" in error_of(httpx.post(url, json={"prompt": [1, 10**6]}), 400)["message"]
    assert error_of(httpx.post(url, json={"prompt": "hi", "max_tokens": 0}), 400)["param"] == "max_tokens"
    ids = list(range(5, 255))  # 250 prompt tokens + 100 > the 256-token context: the numbers in the message
    error = error_of(httpx.post(url, json={"prompt": ids, "max_tokens": 100}), 400)
    assert error["code"] == "context_length_exceeded"
    assert all(str(n) in error["message"] for n in (256, 350, 250, 100))
    chat = server.url + "/v1/chat/completions"
    assert error_of(httpx.post(chat, json={"messages": []}), 400)["param"] == "messages"
    assert error_of(httpx.post(chat, json={"messages": [{"role": "robot", "content": "x"}]}), 400)["param"] == \
        "messages[0]"
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], top_p=3)
    assert caught.value.status_code == 400 and "top_p" in str(caught.value)
    with pytest.raises(openai.NotFoundError):
        client(server).completions.create(model="gpt-4", prompt="hi", max_tokens=1)


def test_401_without_the_key(start_server):
    live = start_server(api_key="sekret")
    with pytest.raises(openai.AuthenticationError) as caught:
        client(live, api_key="wrong").completions.create(model="tiny", prompt="hi", max_tokens=1)
    assert caught.value.status_code == 401
    error = error_of(httpx.get(live.url + "/v1/models"), 401)
    assert error["code"] == "invalid_api_key" and "--api-key" in error["message"]
    assert client(live, api_key="sekret").completions.create(model="tiny", prompt="hi", max_tokens=2).usage
    assert httpx.get(live.url + "/health").status_code == 200  # health and metrics stay open


def test_503_while_loading(start_server, tiny):
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return tiny

    live = start_server(loader=slow_loader, wait=False)
    deadline = time.monotonic() + 10
    while True:  # uvicorn starting
        try:
            response = httpx.get(live.url + "/health")
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert response.status_code == 503
    error = error_of(httpx.post(live.url + "/v1/completions", json={"prompt": "hi"}), 503)
    assert "loading" in error["message"]
    release.set()
    live.wait_ready()
    assert httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_429_when_the_queue_is_full(start_server):
    """One row and a queue of one: a running request, a waiting one, then 429; the waiting one still runs."""
    live = start_server(max_batch=1, max_queue=1)
    long = {"prompt": "hi", "max_tokens": 200, "ignore_eos": True, "stream": True, "temperature": 0}
    with httpx.stream("POST", live.url + "/v1/completions", json=long, timeout=60) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        next(lines)  # its first token: it holds the only row
        assert live.scheduler.rows_used == 1
        waiting = {}
        second = threading.Thread(target=lambda: waiting.update(r=httpx.post(
            live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)))
        second.start()
        deadline = time.monotonic() + 5
        while live.scheduler.waiting < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as caught:
            client(live).completions.create(model="tiny", prompt="hi", max_tokens=3)
        assert caught.value.status_code == 429
        assert caught.value.body["code"] == "rate_limit_exceeded"
    # the first client left: its row goes to the waiting request
    second.join(30)
    assert waiting["r"].status_code == 200 and waiting["r"].json()["usage"]["completion_tokens"] == 3
    metrics = httpx.get(live.url + "/metrics").text
    assert "lmstack_requests_rejected_total 1" in metrics
