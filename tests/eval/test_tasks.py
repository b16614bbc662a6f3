"""Readers for the public layouts, few-shot selection, YAML task files, and bad input named by file:line."""

from __future__ import annotations

import bz2
import collections
import gzip
import json

import pytest

from lmstack.errors import ConfigError, DataError
from lmstack.eval.fewshot import ShotPicker, select_shots
from lmstack.eval.multiple_choice import build_items
from lmstack.eval.taskfile import load_task_file
from lmstack.eval.tasks import read_arc, read_hellaswag, read_mmlu, read_mmlu_redux

HELLASWAG_RECORD = {"ind": 24, "activity_label": "Roof shingle removal",
                    "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
                    "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": 3}


def test_hellaswag_text_form_and_jsonl(hellaswag_task, tmp_path):
    task = hellaswag_task
    assert len(task.docs) == 10042 and {len(d.choices) for d in task.docs} == {4}
    first = task.docs[0]
    assert first.query == "Roof shingle removal: A man is sitting on a roof. he" and first.gold == 3
    assert first.where.endswith(":1") and first.subject == "Roof shingle removal"
    path = tmp_path / "hs.jsonl.gz"  # the JSONL form, gzipped: lm-eval's preprocessing capitalises ctx_b
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(HELLASWAG_RECORD) + "\n")
    doc = read_hellaswag(path).docs[0]
    assert doc.query == "Roof shingle removal: A man is sitting on a roof. He"
    assert doc.choices == first.choices and doc.gold == 3


def test_mmlu_csv_layout_five_shots_from_dev(tmp_path, tiny):
    for split, rows in (("test", 3), ("dev", 6)):
        (tmp_path / split).mkdir()
        lines = [f'"Q{split}{i}, with a comma",a{i},b{i},c{i},d{i},{"ABCD"[i % 4]}' for i in range(rows)]
        (tmp_path / split / f"high_school_physics_{split}.csv").write_text("\n".join(lines) + "\n")
    task = read_mmlu(tmp_path)
    assert len(task.docs) == 3 and task.default_shots == 5
    doc = task.docs[1]
    assert doc.query == "Qtest1, with a comma\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer:" and doc.gold == 1
    shots = select_shots(1, task.docs, task.fewshot, 5)
    assert [s.query.split("\n")[0] for s in shots] == [f"Qdev{i}, with a comma" for i in range(5)]  # first_n
    _, contexts, used = build_items(task, tiny[1], 5)
    assert contexts[0].startswith("The following are multiple choice questions (with answers) about high school "
                                  "physics.\n\nQdev0, with a comma\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer: A\n\nQdev1")
    assert contexts[0].endswith("\n\nQtest0, with a comma\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer:") and used == [5] * 3


def test_few_shot_from_other_items_never_the_item_itself(hellaswag_task):
    task = hellaswag_task
    per_subject = collections.Counter(d.subject for d in task.docs)
    picker = ShotPicker(task.docs)
    for index in range(0, 3000, 13):
        shots = picker.pick(index, 3)
        assert task.docs[index] not in shots and len(shots) == min(3, per_subject[task.docs[index].subject] - 1)
        assert all(s.subject == task.docs[index].subject and s.query != task.docs[index].query for s in shots)
    assert select_shots(5, task.docs, None, 3) == select_shots(5, task.docs, None, 3)  # seeded per item


def test_mmlu_redux_skips_flagged_items_and_arc_layouts(tmp_path):
    redux = tmp_path / "virology.csv"
    redux.write_text('question,choices,answer,error_type\nWhat?,"[\'x\', \'y\', \'z\', \'w\']",2,ok\n'
                     'Bad?,"[\'x\', \'y\', \'z\', \'w\']",0,wrong_groundtruth\n')
    task = read_mmlu_redux(redux)
    assert len(task.docs) == 1 and task.docs[0].gold == 2 and task.docs[0].subject == "virology"
    assert task.skipped == {"error_type=wrong_groundtruth": 1}
    arc = tmp_path / "arc.jsonl"
    arc.write_text(json.dumps({"id": "1", "question": {"stem": "Why?", "choices": [
        {"text": "because", "label": "A"}, {"text": "no", "label": "B"}]}, "answerKey": "B"}) + "\n" +
                   json.dumps({"id": "2", "question": "How?", "choices": {"text": ["so", "not"], "label": ["1", "2"]},
                               "answerKey": "1"}) + "\n")
    docs = read_arc(arc).docs
    assert [(d.query, d.choices, d.gold) for d in docs] == [("Question: Why?\nAnswer:", ["because", "no"], 1),
                                                            ("Question: How?\nAnswer:", ["so", "not"], 0)]


def test_yaml_task_file_and_its_errors(tmp_path):
    data = tmp_path / "quiz.jsonl.bz2"
    with bz2.open(data, "wt") as f:
        f.write(json.dumps({"q": "2+2?", "options": ["3", "4"], "a": "4", "topic": "math"}) + "\n")
        f.write(json.dumps({"q": "Sky?", "options": ["blue", "red"], "a": "A", "topic": "nature"}) + "\n")
    spec = tmp_path / "quiz.yaml"
    spec.write_text("name: quiz\ndata: quiz.jsonl.bz2\nprompt: \"Q: {{q}}\\nA:\"\nchoices: options\nanswer: a\n"
                    "subject: topic\n")
    task = load_task_file(spec)
    assert [(d.query, d.gold, d.subject) for d in task.docs] == [("Q: 2+2?\nA:", 1, "math"), ("Q: Sky?\nA:", 0, "nature")]
    spec.write_text("name: quiz\ndata: quiz.jsonl.bz2\nchoice: options\n")
    with pytest.raises(ConfigError, match="unknown key choice"):
        load_task_file(spec)
    spec.write_text("name: quiz\ndata: quiz.jsonl.bz2\nprompt: '{{question}}'\nchoices: options\nanswer: a\n")
    with pytest.raises(DataError, match=r"quiz.jsonl.bz2:1: prompt template: 'question' is undefined"):
        load_task_file(spec)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": "x", "options": ["a", "b"], "a": 5}) + "\n{not json\n")
    spec.write_text("name: quiz\ndata: bad.jsonl\nprompt: '{{q}}'\nchoices: options\nanswer: a\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: answer 5 is not a choice index in 0..1"):
        load_task_file(spec)
    bad.write_text(json.dumps({"q": "x", "options": ["a", "b"], "a": 1}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_task_file(spec)


def test_hellaswag_text_with_a_bad_gold_line(tmp_path):
    path = tmp_path / "hs.txt"
    path.write_text("ctx: x\n7\na\nb\nc\nd\n")
    with pytest.raises(DataError, match=r"hs.txt:2: answer 7 is not a choice index in 0..3"):
        read_hellaswag(path)
    path.write_text("ctx: x\n1\na\nb\n")
    with pytest.raises(DataError, match="6 lines per task"):
        read_hellaswag(path)
