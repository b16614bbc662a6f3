"""The AI judge: verdict parsing, both-order agreement, RLAIF labels, win rates (ties half, length-controlled),
an OpenAI-compatible judge over real HTTP, and an lmstack model as the judge."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from lmstack.align.judge import CallableJudge, ModelJudge, OpenAIJudge, compare, label_pairs, parse_verdict, win_rate
from lmstack.cli import main as cli
from lmstack.data.preference import read_pairs
from lmstack.errors import GenerationError


def _responses(prompt: str) -> tuple[str, str]:
    a = prompt.split("Response A:\n", 1)[1].split("\n\nResponse B:", 1)[0]
    b = prompt.split("Response B:\n", 1)[1].split("\n\nThe better response", 1)[0]
    return a, b


def prefers_longer(prompt: str) -> str:
    a, b = _responses(prompt)
    return "A" if len(a) >= len(b) else "B"


def prefers_word_good(prompt: str) -> str:
    a, b = _responses(prompt)
    return "A" if "good" in a else "B"


@pytest.mark.parametrize("answer,verdict", [("A", "A"), (" B.", "B"), ("(A) is better", "A"), ("Response B", "B"),
                                            ("answer: A", None), ("a better one", None), ("Both", None), ("", None),
                                            ("**B**", "B")])
def test_parse_verdict(answer, verdict):
    assert parse_verdict(answer) == verdict


def test_both_orders_must_agree():
    items = [("q1", "long answer", "short"), ("q2", "x", "much longer answer")]
    comparisons, counts = compare(CallableJudge(prefers_longer), items)
    assert [c.outcome for c in comparisons] == ["first", "second"]
    position_biased = CallableJudge(lambda p: "A")  # always the first shown: every comparison is a tie
    comparisons, counts = compare(position_biased, items)
    assert [c.outcome for c in comparisons] == ["tie", "tie"] and counts.tie == 2
    off = CallableJudge(lambda p: "I cannot decide")
    _, counts = compare(off, items)
    assert counts.off_format == 2 and counts.examples["off_format"] == "I cannot decide"


def test_label_pairs_keeps_agreed_comparisons_only():
    items = [("q1", "a good answer", "a bad answer"), ("q2", "meh", "good"), ("q3", "x", "y")]
    records, counts = label_pairs(CallableJudge(prefers_word_good), items)
    assert records == [{"prompt": "q1", "chosen": "a good answer", "rejected": "a bad answer"},
                       {"prompt": "q2", "chosen": "good", "rejected": "meh"}]
    assert counts.first == 1 and counts.second == 1 and counts.tie == 1  # q3: neither says good -> B both times


def test_win_rate_counts_ties_half_and_controls_for_length():
    prompts = [f"q{i}" for i in range(40)]
    # a judge that only looks at length, and a policy longer than the reference 3 times in 4: a raw 0.75 ...
    reference = ["word " * 5] * 40
    policy = ["word " * (6 + i % 6) if i % 4 else "word " * (4 - i % 3) for i in range(40)]
    report = win_rate(CallableJudge(prefers_longer), prompts, policy, reference)
    assert report["win_rate"] == 0.75 and report["wins"] == 30 and report["mean_length_difference"] > 0
    # ... that the length-controlled rate does not credit: at equal length the policy has no edge
    assert 0.4 < report["lc_win_rate"] < 0.6
    # ties count half: a position-biased judge ties everything
    tied = win_rate(CallableJudge(lambda p: "B"), prompts[:4], policy[:4], reference[:4])
    assert tied["win_rate"] == 0.5 and tied["ties"] == 4
    # a judge that prefers content, not length: length control leaves the result where it was
    good = win_rate(CallableJudge(prefers_word_good), prompts[:20], ["good"] * 10 + ["bad"] * 10,
                    ["bad"] * 10 + ["good"] * 10)
    assert good["win_rate"] == 0.5 and abs(good["lc_win_rate"] - 0.5) < 1e-6


class _Handler(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat-completions endpoint answering like prefers_longer (or off-format on request)."""

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        content = "Hmm." if "OFF" in prompt else prefers_longer(prompt)
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url():
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_openai_judge_over_http_and_the_label_command(judge_url, tmp_path, capsys):
    judge = OpenAIJudge(judge_url)
    comparisons, counts = compare(judge, [("q", "longer one", "short"), ("OFF topic", "a", "b")])
    assert comparisons[0].outcome == "first" and counts.off_format == 1
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "q1", "response_a": "tiny", "response_b": "a longer answer"},
        {"prompt": "q2", "response_a": "a longer answer", "response_b": "tiny"},
        {"prompt": "OFF", "response_a": "x", "response_b": "y"}]) + "\n")
    out = tmp_path / "prefs.jsonl"
    assert cli(["align", "label", "--judge", judge_url, "--pairs", str(pairs), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"pairs": 3, "labelled": 2, "disagreed": 0, "off_format": 1, "out": str(out)}
    labelled = read_pairs(out)  # what `lmstack align dpo` reads
    assert [(p.chosen, p.rejected) for p in labelled] == [("a longer answer", "tiny")] * 2


def test_unreachable_judge_is_one_clear_error():
    with pytest.raises(GenerationError, match="127.0.0.1:9"):
        OpenAIJudge("http://127.0.0.1:9/v1", timeout=2)(["hello"])


def test_an_lmstack_model_as_judge(tiny_judge):
    model, tokenizer = tiny_judge
    items = [(f"question {i}", "an answer", "another answer") for i in range(3)]
    comparisons, counts = compare(ModelJudge(model, tokenizer, max_new_tokens=3), items)
    assert len(comparisons) == 3 and counts.judged + counts.off_format == 3
    assert all(isinstance(c.answers[0], str) for c in comparisons)


@pytest.fixture
def tiny_judge(tmp_path):
    import pydoc_data.topics
    import torch

    import lmstack
    from lmstack.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(iter(list(pydoc_data.topics.topics.values())[:20]), "bpe", 320)
    torch.manual_seed(0)
    model = lmstack.Transformer(lmstack.preset("llama-tiny", vocab_size=tokenizer.vocab_size, max_seq_len=512,
                                               eos_token_id=tokenizer.eos_token_id))
    return model, tokenizer


def test_winrate_command_generates_both_sides_and_judges(judge_url, task_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+{i}="}) + "\n" for i in range(6)))
    report_file = tmp_path / "report.json"
    assert cli(["align", "winrate", "--judge", judge_url, "--prompts", str(prompts), "--policy", str(task_model_dir),
                "--reference", str(task_model_dir), "--max-new-tokens", "3", "--out", str(report_file)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the same model greedy on both sides: identical answers, which a length judge calls ties (A both times)
    assert report["comparisons"] == 6 and report["ties"] == 6 and report["win_rate"] == 0.5
    saved = json.loads(report_file.read_text())
    assert len(saved["answers"]) == 6 and saved["answers"][0]["policy"] == saved["answers"][0]["reference"]
