"""The scheduler's promises: a client that disconnects (streaming or not) frees its row within one step;
a cached system prompt gives the same tokens as computing it; streamed text never shows U+FFFD for a
character split across tokens; /metrics is valid Prometheus text with the right counts."""

from __future__ import annotations

import time

import pytest
import torch

httpx = pytest.importorskip("httpx")

import lmstack

LONG = {"prompt": "hi", "max_tokens": 240, "ignore_eos": True, "temperature": 0}


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_streaming_disconnect_frees_the_row_within_one_step(server):
    scheduler = server.scheduler
    with httpx.stream("POST", server.url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert scheduler.rows_used == 1
    steps = scheduler.steps
    wait_for(lambda: scheduler.rows_used == 0)
    assert scheduler.release_lags[-1] <= 1  # released at most one step after the server saw the disconnect
    assert scheduler.steps - steps < 100  # long before its 240 tokens


def test_non_streaming_disconnect_frees_the_row(server):
    scheduler = server.scheduler
    lags = len(scheduler.release_lags)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=LONG, timeout=httpx.Timeout(60, read=0.5))
    wait_for(lambda: len(scheduler.release_lags) > lags and scheduler.rows_used == 0)
    assert scheduler.release_lags[-1] <= 1


def test_prefix_cache_reuses_a_system_prompt(start_server, tiny):
    model, tok = tiny
    live = start_server(prefix_cache=2)
    system = {"role": "system", "content": "You are a careful assistant who answers questions about Python "
                                           "statements, expressions and the standard library in short sentences."}
    eos = sorted({tok.token_to_id("<|im_end|>"), tok.eos_token_id})
    for question in ("What is a list?", "What does yield do?", "What is a list?"):
        messages = [system, {"role": "user", "content": question}]
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
        expected = lmstack.generate(model, tok, [ids], max_new_tokens=8, eos_token_ids=eos).texts[0]
        got = httpx.post(live.url + "/v1/chat/completions", timeout=60, json={
            "messages": messages, "max_tokens": 8, "temperature": 0}).json()["choices"][0]["message"]["content"]
        assert got == expected
    metrics = httpx.get(live.url + "/metrics").text
    assert "lmstack_prefix_cache_hits_total 2" in metrics and "lmstack_prefix_cache_misses_total 1" in metrics
    assert live.scheduler.prefix_entries == 1


def test_metrics_are_prometheus_text_with_the_counts(start_server, tiny):
    from prometheus_client.parser import text_string_to_metric_families

    live = start_server()
    httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 5, "ignore_eos": True})
    httpx.post(live.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 4, "ignore_eos": True})
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(live.url + "/metrics").text)}
    value = {name: f.samples[0].value for name, f in families.items() if f.type in ("gauge",)}
    assert value["lmstack_requests_running"] == 0 and value["lmstack_kv_rows_used"] == 0
    assert value["lmstack_kv_rows_total"] == 8
    c = tiny[0].config  # 8 rows of the whole context, K and V per layer, fp32
    assert value["lmstack_kv_pool_bytes"] == 8 * c.max_seq_len * c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4
    assert value["lmstack_generation_tokens_per_second"] > 0
    generated = families["lmstack_generation_tokens"].samples[0].value  # the parser drops _total
    assert generated == 9
    ttft = {s.name: s.value for s in families["lmstack_time_to_first_token_seconds"].samples if "bucket" not in s.name}
    assert ttft["lmstack_time_to_first_token_seconds_count"] == 2
    finished = {s.labels["outcome"]: s.value for s in families["lmstack_requests_finished"].samples}
    assert finished == {"length": 2}


def test_stream_never_splits_a_character(start_server, tiny):
    """A model taught one sentence with CJK characters, each split over byte tokens: no chunk holds U+FFFD."""
    model, tok = tiny
    sentence = "Say it: 日本語 ✓ ok"
    ids = tok.encode(sentence, add_special_tokens=False)
    prompt = tok.encode("Say it:", add_special_tokens=False)
    assert ids[:len(prompt)] == prompt
    assert any("\ufffd" in tok.decode([t]) for t in ids[len(prompt):])  # a character really is split
    taught = _teach(model, ids)
    reference = lmstack.generate(taught, tok, [prompt], max_new_tokens=len(ids) - len(prompt), ignore_eos=True)
    assert reference.texts[0] == sentence[len("Say it:"):]
    live = start_server(loader=lambda: (taught, tok))
    response = httpx.post(live.url + "/v1/completions", timeout=60, json={
        "prompt": prompt, "max_tokens": len(ids) - len(prompt), "temperature": 0, "stream": True, "ignore_eos": True})
    import json

    pieces = [json.loads(e[6:])["choices"][0]["text"] for e in response.text.split("\n\n")
              if e.startswith("data: {")]
    assert "".join(pieces) == reference.texts[0]
    assert not any("\ufffd" in p for p in pieces)
    assert len([p for p in pieces if p]) > 3  # it did stream piece by piece


def _teach(model, ids: list[int]):
    """A copy of `model` trained to continue ids[:k] with the rest of ids (a few hundred Adam steps)."""
    import copy

    taught = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(taught.parameters(), lr=3e-3)
    tokens = torch.tensor([ids])
    torch.manual_seed(0)
    for _ in range(150):
        logits = taught(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[0], tokens[0, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return taught.eval()


def test_a_copied_prefix_gives_the_full_prefill_logits(tiny):
    """DecodeSession.read_slots / write_slots + prefill(start=n), what the prefix cache runs on."""
    from lmstack.generate import DecodeSession

    model, _ = tiny
    prompt = list(range(5, 45))
    with DecodeSession(model, rows=3, cache_len=64) as session:
        full = session.prefill([prompt], [0])  # (1, V)
        prefix = session.read_slots(0, 30)
        session.write_slots([1, 2], prefix)
        resumed = session.prefill([prompt, prompt[:31]], [1, 2], start=30)  # (2, V)
        alone = session.prefill([prompt[:31]], [0])
        assert session.lengths.tolist() == [31, 40, 31]
    torch.testing.assert_close(resumed[0], full[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(resumed[1], alone[0], atol=1e-5, rtol=1e-5)


def test_a_partly_empty_pool_of_long_rows_decodes_only_what_it_holds(tiny):
    """The scheduler's batch decodes rows [0, highest in use] over the slots they hold (a view of the pool):
    rows that join, leave and leave holes give the tokens of `lmstack.generate` alone, and the logits of the
    full-width decode."""
    from lmstack.generate import DecodeSession
    from lmstack.generate.config import GenerationConfig
    from lmstack.generate.continuous import ContinuousBatch

    model, tok = tiny
    prompts = [list(range(5, 5 + n)) for n in (7, 30, 12)]
    greedy = GenerationConfig(max_new_tokens=20, temperature=0, ignore_eos=True)
    expected = [lmstack.generate(model, None, [p], max_new_tokens=20, ignore_eos=True).token_ids[0] for p in prompts]
    with ContinuousBatch(model, tok, rows=6, cache_len=256) as batch:
        rows = [batch.add(prompts[0], greedy), batch.add(prompts[1], greedy)]
        for _ in range(3):
            batch.step()
        batch.release(rows[0])  # a hole below the highest live row
        rows.append(batch.add(prompts[2], greedy))  # takes the hole
        while batch.has_running():
            batch.step()
        got = [batch.sequence(rows[1]).ids, batch.sequence(rows[2]).ids]
    assert got == [expected[1], expected[2]]
    with DecodeSession(model, rows=4, cache_len=256) as session:
        session.prefill([prompts[0], prompts[1]], [0, 1])
        tokens = torch.tensor([3, 4, 0, 0])
        full = session.decode(tokens)  # (4, V)
        session.lengths -= session.running  # write the same slots again, through the window
        window = session.decode(tokens, rows=2)  # (2, V) over 64 slots
    torch.testing.assert_close(window, full[:2], atol=1e-5, rtol=1e-5)


def test_requests_admitted_together_keep_their_own_tokens(tiny):
    """ContinuousBatch.add_groups (the scheduler's admission of every request that arrived during a step): one
    prefill for all, and each request's tokens are what it gets alone, greedy or sampled with its seed."""
    from lmstack.generate.config import GenerationConfig
    from lmstack.generate.continuous import ContinuousBatch

    model, tok = tiny
    short, long = list(range(5, 12)), list(range(20, 50))
    greedy = GenerationConfig(max_new_tokens=12, temperature=0, ignore_eos=True)
    sampled = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=3, ignore_eos=True)

    def run(groups):
        with ContinuousBatch(model, tok, rows=4, cache_len=128) as batch:
            rows = batch.add_groups(groups)
            while batch.has_running():
                batch.step()
            return [[batch.sequence(r).ids for r in group] for group in rows]

    together = run([([short], greedy), ([long, long], sampled)])
    assert together[0] == run([([short], greedy)])[0]
    assert together[1] == run([([long, long], sampled)])[0]
    assert together[0][0] == lmstack.generate(model, None, [short], max_new_tokens=12, ignore_eos=True).token_ids[0]


def test_one_hand_off_per_step_whatever_the_number_of_requests(tiny):
    """The scheduler hands each step's events of every job to the consumers' side in one call."""
    import threading

    from lmstack.generate.config import GenerationConfig
    from lmstack.serve.scheduler import Job, Scheduler

    model, tok = tiny
    handoffs, done = [], threading.Semaphore(0)
    scheduler = Scheduler(model, tok, rows=4, row_len=64, max_queue=8, handoff=lambda fn: (handoffs.append(1), fn()))
    received: dict[int, list] = {0: [], 1: [], 2: []}

    def emit_for(k):
        def emit(events):
            received[k].extend(events)
            if any(e.done is not None for e in events):
                done.release()
        return emit

    config = GenerationConfig(max_new_tokens=5, temperature=0, ignore_eos=True)
    for k in range(3):  # queued before the loop starts: admitted together, five steps for all three
        scheduler.submit(Job([[5 + k, 6, 7]], config, emit_for(k)))
    scheduler.start()
    for _ in range(3):
        assert done.acquire(timeout=30)
    scheduler.stop()
    assert scheduler.steps == 5 and len(handoffs) == 5
    assert all(len([e for e in events if e.token_id is not None]) == 5 for events in received.values())


def test_requests_arriving_together_at_an_idle_pool_start_in_one_step(tiny):
    """With batch_wait, a request that finds the pool idle waits for one arriving a few ms later: both get their
    first token in the same step (one prefill), so they decode in step and finish together."""
    import threading

    from lmstack.generate.config import GenerationConfig
    from lmstack.serve.scheduler import Job, Scheduler

    model, tok = tiny
    scheduler = Scheduler(model, tok, rows=4, row_len=64, max_queue=8, batch_wait=0.2)
    first_step: dict[int, int] = {}
    finished = threading.Semaphore(0)

    def emit_for(k):
        def emit(events):  # called on the scheduler thread (no handoff): its step count is this step's
            if any(e.token_id is not None for e in events):
                first_step.setdefault(k, scheduler.steps)
            if any(e.done is not None for e in events):
                finished.release()
        return emit

    config = GenerationConfig(max_new_tokens=4, temperature=0, ignore_eos=True)
    scheduler.start()
    scheduler.submit(Job([[5, 6, 7]], config, emit_for(0)))
    time.sleep(0.02)
    scheduler.submit(Job([[8, 6, 7]], config, emit_for(1)))
    for _ in range(2):
        assert finished.acquire(timeout=30)
    scheduler.stop()
    assert first_step[0] == first_step[1] and scheduler.steps == 4
