"""The server through the official `openai` client and raw HTTP: greedy output equals `lmstack.generate`
(alone and among 15 other requests), the streaming chunk rules, logprobs, n and seeds."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import lmstack

PROMPT = "The list of statements"
CHAT = [{"role": "system", "content": "You answer in one line."}, {"role": "user", "content": "What is a tuple?"}]


def client(server, **options):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=options.pop("api_key", "none"), max_retries=0,
                         **options)


def sse_chunks(response) -> list:
    """The data of each server-sent event; the last must be [DONE]."""
    events = [line[len("data: "):] for line in response.text.split("\n\n") if line]
    assert all(not e.startswith("data:") for e in events)
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_completion_greedy_equals_generate_with_logprobs(server, tiny):
    model, tok = tiny
    reference = lmstack.generate(model, tok, PROMPT, max_new_tokens=12, logprobs=True, top_logprobs=3)
    out = client(server).completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3)
    choice = out.choices[0]
    assert choice.text == reference.texts[0]
    assert choice.finish_reason == {"length": "length", "eos": "stop", "stop": "stop"}[reference.finish_reasons[0]]
    assert choice.logprobs.token_logprobs == pytest.approx(reference.logprobs[0], abs=1e-5)
    assert choice.logprobs.tokens == [tok.decode([t]) for t in reference.token_ids[0]]
    top0 = reference.top_logprobs[0][0]  # {id: logprob}, most likely first
    assert list(choice.logprobs.top_logprobs[0].values()) == pytest.approx(list(top0.values()), abs=1e-5)
    assert out.usage.prompt_tokens == len(tok.encode(PROMPT, add_special_tokens=True))
    assert out.usage.completion_tokens == len(reference.token_ids[0])
    assert out.model == "tiny" and out.object == "text_completion"


def test_chat_greedy_equals_generate_alone_and_among_15_others(server, tiny):
    model, tok = tiny
    ids = tok.encode(tok.apply_chat_template(CHAT, add_generation_prompt=True), add_special_tokens=False)
    eos = sorted({tok.token_to_id("<|im_end|>"), tok.eos_token_id})
    reference = lmstack.generate(model, tok, [ids], max_new_tokens=12, eos_token_ids=eos).texts[0]
    c = client(server)
    alone = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0)
    assert alone.choices[0].message.content == reference and alone.choices[0].message.role == "assistant"
    assert alone.usage.prompt_tokens == len(ids)

    def other(i: int) -> str:  # sampled, different lengths and settings: they join and leave around ours
        r = c.completions.create(model="tiny", prompt=f"Item {i}: " * (1 + i % 4), max_tokens=4 + i,
                                 temperature=0.8, top_p=0.9, seed=i)
        return r.choices[0].text

    def ours() -> str:
        return c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0
                                         ).choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        others = [pool.submit(other, i) for i in range(15)]
        mine = pool.submit(ours)
        assert mine.result() == reference
        assert all(isinstance(f.result(), str) for f in others)
    assert server.scheduler.rows_used == 0


def test_chat_stream_chunk_rules(server):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 8, "temperature": 0, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    chunks = sse_chunks(response)
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    usage = [c for c in chunks if c.get("usage")]
    assert len(usage) == 1 and usage[0] is chunks[-1] and usage[0]["choices"] == []  # exactly one, last
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    non_stream = client(server).chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0)
    for index in (0, 1):
        mine = [ch for c in chunks[:-1] for ch in c["choices"] if ch["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}  # the role first
        assert all("role" not in ch["delta"] for ch in mine[1:])
        finishes = [ch["finish_reason"] for ch in mine]
        assert finishes[:-1] == [None] * (len(mine) - 1) and finishes[-1] in ("stop", "length")
        assert mine[-1]["delta"] == {}
        text = "".join(ch["delta"].get("content", "") for ch in mine)
        assert text == non_stream.choices[0].message.content  # greedy: both choices alike
    # the openai client reads the same stream
    stream = client(server).chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0,
                                                    stream=True, stream_options={"include_usage": True})
    pieces, usages = [], []
    for chunk in stream:
        usages += [chunk.usage] if chunk.usage else []
        pieces += [chunk.choices[0].delta.content or ""] if chunk.choices else []
    assert "".join(pieces) == text and len(usages) == 1 and usages[0].completion_tokens > 0


def test_completion_stream_without_usage_and_echo(server, tiny):
    model, tok = tiny
    reference = lmstack.generate(model, tok, PROMPT, max_new_tokens=10).texts[0]
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stream": True, "echo": True}
    chunks = sse_chunks(httpx.post(server.url + "/v1/completions", json=body, timeout=60))
    assert all("usage" not in c for c in chunks)  # no usage chunk unless asked
    assert "".join(c["choices"][0]["text"] for c in chunks) == PROMPT + reference
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


def test_echo_scores_the_prompt_like_a_forward_pass(server, tiny):
    """echo + logprobs + max_tokens 0 (lm-eval's scoring): log p of every prompt token after the first."""
    import torch

    model, tok = tiny
    ids = tok.encode("def f(x): return x", add_special_tokens=False)
    out = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": [ids, ids[:5]], "max_tokens": 0,
                                                            "echo": True, "logprobs": 1, "temperature": 0}).json()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).float()[0], -1)
    expected = [None] + [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    got = out["choices"][0]["logprobs"]["token_logprobs"]
    assert got[0] is None and got[1:] == pytest.approx(expected[1:], abs=1e-5)
    assert out["choices"][0]["text"] == tok.decode(ids)
    assert len(out["choices"][1]["logprobs"]["token_logprobs"]) == 5
    assert out["usage"] == {"prompt_tokens": len(ids) + 5, "completion_tokens": 0, "total_tokens": len(ids) + 5}
    top = out["choices"][0]["logprobs"]["top_logprobs"][1]
    assert list(top.values()) == pytest.approx([logp[0].max().item()], abs=1e-5)


def test_seeded_samples_repeat_and_n_differs(server):
    c = client(server)
    kwargs = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 7}
    a, b = c.completions.create(n=3, **kwargs), c.completions.create(n=3, **kwargs)
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert len({x.text for x in a.choices}) > 1
    assert [x.index for x in a.choices] == [0, 1, 2]
    models = c.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_top_logprobs_are_normalised(server):
    out = client(server).chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0,
                                                 logprobs=True, top_logprobs=5)
    for entry in out.choices[0].logprobs.content:
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)  # greedy = the top one
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1 + 1e-5


def test_stop_strings_and_a_batch_of_prompts_with_n(server, tiny):
    model, tok = tiny
    reference = lmstack.generate(model, tok, [PROMPT, "Assignment"], max_new_tokens=16)
    text = reference.texts[0]
    stop = text[len(text) // 2:len(text) // 2 + 3]  # a string the greedy continuation reaches
    expected = text[:text.index(stop)]
    out = client(server).completions.create(model="tiny", prompt=[PROMPT, "Assignment"], n=2, max_tokens=16,
                                            temperature=0, stop=[stop])
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text == expected  # prompt 0's two samples
    assert out.choices[0].finish_reason == "stop"
    second = reference.texts[1]
    if stop in second:
        second = second[:second.index(stop)]
    assert out.choices[2].text == out.choices[3].text == second
