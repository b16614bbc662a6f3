"""lm-evaluation-harness's `local-completions` backend against the server gives what `lmstack eval` gives on
the same model and task: every choice's log-likelihood (1e-4), acc and acc_norm. lm-eval sends token-id
prompts with echo, logprobs=1 and max_tokens=1 and sums token_logprobs after the context."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval's API models need lm-eval[api]

from lmstack.eval.multiple_choice import evaluate_multiple_choice
from lmstack.eval.taskfile import load_task_file

ITEMS = [
    ("A for loop iterates over", ["the items of a sequence", "nothing at all", "the moon", "a closed door"], 0),
    ("The return statement leaves", ["a function call", "the building", "a green apple", "music"], 0),
    ("An if statement is used for", ["conditional execution", "baking bread", "flying", "the weather"], 0),
    ("The import statement loads", ["a module", "a truck", "the dishes", "a song"], 0),
    ("A with statement wraps", ["a block with methods of a context manager", "a gift", "paper", "a tree"], 0),
    ("The del statement", ["deletes a name binding", "grows flowers", "paints walls", "sings"], 0),
]


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_serve")
    with open(root / "test.jsonl", "w") as f:
        f.writelines(json.dumps({"query": q, "choices": c, "label": a}) + "\n" for q, c, a in ITEMS)
    (root / "tasks").mkdir()
    (root / "tasks" / "mc.yaml").write_text(
        f"task: lmstack_serve_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'test.jsonl'}\n"
        "test_split: test\nnum_fewshot: 0\noutput_type: multiple_choice\ndoc_to_text: '{{query}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\ntarget_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (root / "mc_lmstack.yaml").write_text("name: serve\ndata: test.jsonl\nprompt: '{{query}}'\nchoices: choices\n"
                                          "answer: label\nshots: 0\n")
    return root


@pytest.mark.slow  # ~20 s: lm-eval's own start-up dominates
def test_local_completions_matches_lmstack_eval(server, tiny, tiny_model_dir, task_files):
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import lm_eval
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    model, tokenizer = tiny
    ours = evaluate_multiple_choice(model, tokenizer, load_task_file(task_files / "mc_lmstack.yaml"), batch_size=4)
    # add_bos_token: lmstack eval encodes as `tok(text)` does, with the tokenizer's BOS
    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="tiny", tokenizer_backend="huggingface",
                             tokenizer=str(tiny_model_dir), max_length=256, add_bos_token=True, batch_size=4,
                             num_concurrent=2, max_retries=1)
    out = lm_eval.simple_evaluate(model=lm, tasks=["lmstack_serve_mc"], log_samples=True, verbosity="ERROR",
                                  task_manager=TaskManager(include_path=str(task_files / "tasks"), include_defaults=False))
    results = out["results"]["lmstack_serve_mc"]
    samples = sorted(out["samples"]["lmstack_serve_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(ours.samples) == len(ITEMS)
    for theirs, mine in zip(samples, ours.samples):
        assert [r[0] for r in theirs["filtered_resps"]] == pytest.approx(mine["loglikelihoods"], abs=1e-4)
        assert theirs["acc"] == mine["acc"] and theirs["acc_norm"] == mine["acc_norm"]
    assert ours.value("acc") == pytest.approx(results["acc,none"])
    assert ours.value("acc_norm") == pytest.approx(results["acc_norm,none"])
