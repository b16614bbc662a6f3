"""Generation tasks (prompts, batching through lmstack.generate, metrics on the outputs) and the pairwise judge."""

from __future__ import annotations

import json

import pytest

import lmstack
from lmstack.eval.generation import build_prompts, evaluate_generation, generate_answers, read_gsm8k, read_squad
from lmstack.eval.judge import pairwise, verdicts
from lmstack.eval.metrics import corpus_bleu, rouge
from lmstack.eval.taskfile import load_task_file


def test_gsm8k_prompt_is_lm_evals_five_shot_layout(shared_data):
    task = read_gsm8k(shared_data / "gsm8k" / "train.jsonl")
    prompts, used = build_prompts(task, 5, limit=3)
    assert used == [5, 5, 5]
    for doc, prompt in zip(task.docs, prompts):
        blocks = prompt.split("\n\n")
        assert blocks[-1] == doc.query and doc.query.startswith("Question: ") and doc.query.endswith("\nAnswer:")
        assert prompt.count("Question: ") == 6 and prompt.count("#### ") == 5
        assert doc.references[0] not in prompt  # never its own worked solution


def test_batched_generation_equals_each_prompt_alone(tiny):
    model, tokenizer = tiny
    prompts = ["Roof shingle removal: A man", "Sumo: two men", "Archery: A woman picks up a bow and"]
    batched, truncated = generate_answers(model, tokenizer, prompts, ["."], 12, batch_size=3)
    assert truncated == 0
    for prompt, text in zip(prompts, batched):
        ids = tokenizer.encode(prompt, add_special_tokens=True)
        alone = lmstack.generate(model, tokenizer, [ids], max_new_tokens=12, stop=["."]).texts[0]
        assert text == alone


def test_yaml_generation_task_scores_with_sacrebleu_and_rouge(tiny, tmp_path):
    model, tokenizer = tiny
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in [
        ("The man is sitting on a", "roof"), ("Two women are in a", ["canoe", "boat"]), ("A boy runs down a", "track")]))
    (tmp_path / "qa.yaml").write_text("name: qa\nkind: generate\ndata: qa.jsonl\nprompt: '{{q}}'\nanswer: a\n"
                                      "until: ['\\n']\nmax_new_tokens: 8\nmetrics: [exact_match, f1, bleu, rouge]\n")
    task = load_task_file(tmp_path / "qa.yaml")
    result = evaluate_generation(model, tokenizer, task, batch_size=2)
    outputs = [s["output"] for s in result.samples]
    refs = [s["references"] for s in result.samples]
    bleu, signature = corpus_bleu(outputs, refs)
    assert result.value("bleu") == pytest.approx(bleu) and result.info["bleu_signature"] == signature
    expected = rouge(outputs, refs)
    for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert result.value(name) == pytest.approx(sum(expected[name]) / 3)
    assert {m.metric for m in result.metrics} >= {"exact_match", "f1"}


def test_squad_reader(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "Paris", "paragraphs": [{
        "context": "Paris is the capital of France.",
        "qas": [{"id": "1", "question": "Capital of France?", "answers": [{"text": "Paris", "answer_start": 0}]},
                {"id": "2", "question": "Capital of Mars?", "answers": [], "is_impossible": True}]}]}]}))
    docs = read_squad(path).docs
    assert docs[0].references == ["Paris"] and docs[1].references == [""]
    assert docs[0].query == ("Title: Paris\n\nBackground: Paris is the capital of France.\n\n"
                             "Question: Capital of France?\n\nAnswer:")


def test_judge_both_orders(tiny):
    judge, tokenizer = tiny
    questions = ["What is a roof?", "Name a sport.", "Why swim?"]
    a = ["A roof covers a house.", "Sumo.", "To cool down."]
    b = ["Blue.", "Archery is a sport.", "Because water."]
    result = pairwise(judge, tokenizer, questions, a, b, batch_size=2)
    forward = verdicts(judge, tokenizer, questions, a, b)
    backward = verdicts(judge, tokenizer, questions, b, a)
    expected = []
    for v1, v2 in zip(forward, backward):
        v2 = {"A": "B", "B": "A"}.get(v2, v2)
        expected.append(1.0 if v1 == v2 == "A" else 0.0 if v1 == v2 == "B" else 0.5)
    assert [s["result"] for s in result.samples] == [{1.0: "win", 0.5: "tie", 0.0: "loss"}[e] for e in expected]
    assert result.value("win_rate") == pytest.approx(sum(expected) / 3)
    # the same answer on both sides can never win or lose: the swapped order cancels any position preference
    same = pairwise(judge, tokenizer, questions, a, a)
    assert same.value("win_rate") == 0.5 and same.info["tie"] == 3
