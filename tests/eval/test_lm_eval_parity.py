"""lmstack eval against lm-evaluation-harness's `hf` backend on the same exported model and local files.

lm-eval runs offline on a local task file (`dataset_path: json` + `data_files`); transformers loads the
lmstack-saved directory. Compared: every item's context text, every choice's log-likelihood (1e-4), acc and
acc_norm for a 2-shot multiple-choice task (dev split, first_n), and the rolling log-likelihood and
word / byte perplexity and bits per byte of multi-window documents.
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("lm_eval")

from lmstack.eval.multiple_choice import evaluate_multiple_choice
from lmstack.eval.perplexity import evaluate_perplexity, read_documents
from lmstack.eval.taskfile import load_task_file


@pytest.fixture(scope="module")
def files(tmp_path_factory, shared_data, hellaswag_task):
    root = tmp_path_factory.mktemp("lm_eval_parity")
    task = hellaswag_task
    for name, docs in (("test", task.docs[3:15]), ("dev", task.docs[:3])):
        with open(root / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"query": d.query, "choices": d.choices, "label": d.gold}) + "\n" for d in docs)
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    with open(root / "text.jsonl", "w") as f:
        for i in range(3):  # 2,000-2,600 characters: several 256-token windows each
            f.write(json.dumps({"text": text[i * 3000:i * 3000 + 2000 + 300 * i]}) + "\n")
    lm_eval_tasks = root / "tasks"
    lm_eval_tasks.mkdir()
    (lm_eval_tasks / "mc.yaml").write_text(
        f"task: lmstack_parity_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'test.jsonl'}\n    dev: {root / 'dev.jsonl'}\n"
        "test_split: test\nfewshot_split: dev\nfewshot_config:\n  sampler: first_n\nnum_fewshot: 2\n"
        "output_type: multiple_choice\ndoc_to_text: '{{query}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (lm_eval_tasks / "ppl.yaml").write_text(
        f"task: lmstack_parity_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'text.jsonl'}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n"
        "  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    # the same JSONL through lmstack's own task file
    (root / "mc_lmstack.yaml").write_text("name: parity\ndata: test.jsonl\nfewshot_data: dev.jsonl\n"
                                          "prompt: '{{query}}'\nchoices: choices\nanswer: label\nshots: 2\n")
    return root


def run_lm_eval(model_dir, tasks_dir, task: str, **model_args):
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model_dir), batch_size=4, device="cpu", **model_args)
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                                  log_samples=True, verbosity="ERROR")
    return out["results"][task], sorted(out["samples"][task], key=lambda s: s["doc_id"])


def test_multiple_choice_matches_lm_eval(files, tiny, tiny_model_dir):
    model, tokenizer = tiny
    ours = evaluate_multiple_choice(model, tokenizer, load_task_file(files / "mc_lmstack.yaml"), batch_size=4)
    results, samples = run_lm_eval(tiny_model_dir, files / "tasks", "lmstack_parity_mc")
    assert len(samples) == len(ours.samples) == 12
    for theirs, mine in zip(samples, ours.samples):
        assert theirs["arguments"][0][0] == mine["context"]  # the same 2-shot prompt text
        assert [r[0] for r in theirs["filtered_resps"]] == pytest.approx(mine["loglikelihoods"], abs=1e-4)
        assert theirs["acc"] == mine["acc"] and theirs["acc_norm"] == mine["acc_norm"]
    assert ours.value("acc") == pytest.approx(results["acc,none"])
    assert ours.value("acc_norm") == pytest.approx(results["acc_norm,none"])


def test_rolling_perplexity_matches_lm_eval(files, tiny, tiny_model_dir):
    model, tokenizer = tiny
    ours = evaluate_perplexity(model, tokenizer, read_documents([files / "text.jsonl"]), batch_size=4)
    assert ours.info["windows"] > 3 * 2  # several windows per document
    # add_bos_token=False: lm-eval would otherwise encode the tokenizer's BOS into the text itself
    results, samples = run_lm_eval(tiny_model_dir, files / "tasks", "lmstack_parity_ppl", add_bos_token=False)
    assert [s["filtered_resps"][0] for s in samples] == pytest.approx([s["loglikelihood"] for s in ours.samples],
                                                                       abs=1e-4)
    value = {m.metric: m.value for m in ours.metrics}
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert value[metric] == pytest.approx(results[f"{metric},none"], rel=1e-6)
