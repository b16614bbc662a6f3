"""The built-in verifiable task: every answer is right (checked by reading the prompt back, independently of the
generator), problems are distinct, held-out sets exclude training prompts, and running out of problems is an
error, not an endless loop."""

from __future__ import annotations

import re

import pytest

from lmstack.data.instruct_tasks import KINDS, exact_match, generate_tasks, pretraining_lines
from lmstack.data.sft import SFTDataConfig
from lmstack.errors import ConfigError
from lmstack.train.recipes.finetune import load_records


def solve(prompt: str) -> str:
    if m := re.fullmatch(r"What is (\d+) plus (\d+)\?", prompt):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"Sort these numbers from smallest to largest: ([\d ]+)", prompt):
        return " ".join(sorted(m[1].split(), key=int))
    if m := re.fullmatch(r"Write the letters of '([a-z]+)' in reverse order\.", prompt):
        return m[1][::-1]
    if m := re.fullmatch(r"Write '([a-z]+)' in capital letters\.", prompt):
        return m[1].upper()
    raise AssertionError(f"unknown prompt {prompt!r}")


def test_answers_are_right_distinct_and_held_out_sets_are_unseen():
    train = generate_tasks(2000, 0)
    assert generate_tasks(2000, 0) == train  # a pure function of (n, seed)
    assert len({r["prompt"] for r in train}) == 2000
    for i, record in enumerate(train):
        assert record["completion"] == solve(record["prompt"])
        assert KINDS[i % len(KINDS)] == ("add" if "plus" in record["prompt"] else "sort" if "Sort" in record["prompt"]
                                         else "reverse" if "reverse" in record["prompt"] else "upper")
    held = generate_tasks(400, 12345, exclude=(r["prompt"] for r in train))
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in train}
    assert exact_match(" 65\n", "65") and not exact_match("6 5", "65")


def test_running_out_of_problems_is_an_error():
    with pytest.raises(ValueError, match="only 900 distinct 'add' problems"):
        generate_tasks(4 * 901, 0)
    with pytest.raises(ConfigError, match="data.max_samples=4000"):
        load_records(SFTDataConfig(train="builtin:instruct-tasks", max_samples=4000))


def test_pretraining_lines_hold_prompts_and_drills_never_answers():
    lines = pretraining_lines(400, 0)
    assert lines == pretraining_lines(400, 0) and lines != pretraining_lines(400, 1)
    for i, line in enumerate(lines):
        if i % 4 == 0:
            solve(line)  # a whole prompt, nothing after it: solve() full-matches and would reject an appended answer
        elif i % 4 == 1:
            m = re.fullmatch(r"'([a-z]{3,6})', I said again: '([a-z]{3,6})'\.", line)
            assert m and m[1] == m[2]
        elif i % 4 == 2:
            m = re.fullmatch(r"The numbers were ([\d ]+); again, ([\d ]+)\.", line)
            assert m and m[1] == m[2]
        else:
            numbers = [int(k) for k in re.fullmatch(r"Counting: ([\d ]+)\.", line)[1].split()]
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    assert {("plus" in ln, "Sort" in ln, "reverse" in ln, "capital" in ln) for ln in lines[::4]} == {
        (True, False, False, False), (False, True, False, False), (False, False, True, False), (False, False, False, True)}
