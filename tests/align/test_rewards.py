"""The shipped reward functions (exact-match arithmetic, GSM8K's `#### n`) by hand and on the real GSM8K
file, their resolution by name, and how score_samples weighs them and drops the samples they fail on."""

from __future__ import annotations

import json
import math

import pytest

from lmstack.align.rewards import (RewardStats, arithmetic_exact_match, gsm8k_answer, gsm8k_final_answer, gsm8k_format,
                                   resolve_reward_fn, score_samples)
from lmstack.align.tasks import arithmetic_problems
from lmstack.errors import ConfigError


@pytest.mark.parametrize("completion,reward", [("57", 1.0), (" 57<eos>", 1.0), ("57 and 3", 1.0), ("5 7", 0.0),
                                               ("56", 0.0), ("", 0.0), ("057", 1.0), ("-57", 0.0)])
def test_arithmetic_exact_match_reads_the_first_number(completion, reward):
    assert arithmetic_exact_match("12+45=", completion, {"answer": 57}) == reward


def test_arithmetic_tasks_answers_are_their_sums():
    for record in arithmetic_problems(50, seed=3):
        a, b = record["prompt"].rstrip("=").split("+")
        assert arithmetic_exact_match(record["prompt"], str(int(a) + int(b)), record) == 1.0


@pytest.mark.parametrize("text,answer", [("so 3 + 4 = 7\n#### 7", "7"), ("#### 1,234", "1234"), ("#### $18.", "18"),
                                         ("#### 2.50", "2.5"), ("#### 1\n#### -3", "-3"), ("the answer is 7", None),
                                         ("####", None)])
def test_gsm8k_final_answer(text, answer):
    assert gsm8k_final_answer(text) == answer


def test_gsm8k_rewards_on_the_real_file(shared_data):
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:200]
    records = [json.loads(line) for line in lines]
    for record in records:  # the reference solution itself earns the answer and the format reward
        assert gsm8k_answer(record["question"], record["answer"], record) == 1.0
        assert gsm8k_format(record["question"], record["answer"], record) == 1.0
    first = records[0]  # "... #### 72"
    assert gsm8k_answer(first["question"], "48 + 24 = 72\n#### 72", first) == 1.0
    assert gsm8k_answer(first["question"], "#### 73", first) == 0.0
    assert gsm8k_answer(first["question"], "72", first) == 0.0 == gsm8k_format(first["question"], "72", first)
    assert gsm8k_answer("q", "#### 72", {"answer": 72}) == 1.0  # a bare number as the reference


def test_reward_functions_resolve_by_name_or_module_path():
    assert resolve_reward_fn("gsm8k_answer") is gsm8k_answer
    assert resolve_reward_fn("lmstack.align.rewards:gsm8k_format") is gsm8k_format
    with pytest.raises(ConfigError, match="unknown reward function 'gsm8k'.*arithmetic_exact_match"):
        resolve_reward_fn("gsm8k")
    with pytest.raises(ConfigError, match="lmstack.align.rewards:nope"):
        resolve_reward_fn("lmstack.align.rewards:nope")


def test_score_samples_weighs_and_drops_counted():
    def picky(prompt, completion, fields):
        if completion == "boom":
            raise KeyError("answer")
        return {"nan": math.nan, "text": "1"}.get(completion, 2.0)

    stats = RewardStats()
    rewards = score_samples([picky, lambda p, c, f: c == "ok"], [0.5, 3.0], ["q"] * 5,
                            ["ok", "no", "boom", "nan", "text"], [{}] * 5, stats)
    assert rewards[:2] == [0.5 * 2.0 + 3.0, 0.5 * 2.0]  # a bool counts as 1 / 0
    assert all(math.isnan(r) for r in rewards[2:])
    assert stats.scored == 2 and stats.dropped == {"raised": 1, "not_finite": 2}
    assert stats.first_error["raised"] == "picky: KeyError: 'answer'"
    assert stats.first_error["not_finite"] == "picky returned nan"
