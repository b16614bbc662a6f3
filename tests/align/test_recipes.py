"""The alignment recipe end to end on a tiny character-level model: a short golden run per method (the loss
curve computed once and checked in: tests/align/golden_runs.json), exact resume through each checkpoint
store, the on-disk reference cache, reward functions that fail, and the CLI with a shipped config.

Regenerate the golden curves after an intended change with LMSTACK_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import lmstack
from lmstack.interop.hf_heads import load_score_model
from lmstack.schema import load_config
from lmstack.train.metrics import read_metrics
from lmstack.train.recipes.align import AlignConfig, build, run

GOLDEN = Path(__file__).with_name("golden_runs.json")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def count_ones(prompt: str, completion: str, fields: dict) -> float:
    """A reward a random model's samples vary on (so the advantages are not all zero)."""
    return float(completion.count("1")) + 0.1 * len(completion)


def flaky(prompt: str, completion: str, fields: dict) -> float:
    """Raises on some samples and returns NaN on others: each such sample must be dropped and counted."""
    if "7" in completion:
        raise ValueError("no sevens")
    return math.nan if "3" in completion else 1.0


REWARD = "tests.align.test_recipes:count_ones"
METHODS = {
    "rm": {"data": {"task": "sorted_letters"}},
    "dpo": {"data": {"task": "sorted_letters"}, "dpo": {"loss": "sigmoid", "beta": 0.5}},
    "kto": {"method": "dpo", "data": {"task": "sorted_letters"}, "dpo": {"loss": "kto", "beta": 0.5}},
    "ipo": {"method": "dpo", "data": {"task": "sorted_letters"}, "dpo": {"loss": "ipo", "beta": 0.5}},
    "grpo": {"data": {"task": "arithmetic"}, "grpo": {"reward_fns": [REWARD], "group_size": 4, "beta": 0.1}},
    "rloo": {"data": {"task": "arithmetic"}, "grpo": {"reward_fns": [REWARD], "group_size": 4}},
    "ppo": {"data": {"task": "arithmetic"}, "ppo": {"reward_fns": [REWARD]},
            "rollout": {"epochs": 2, "prompts_per_rollout": 4, "max_new_tokens": 4}},
}


def config(name: str, model_dir: Path, out: Path, **changes) -> AlignConfig:
    spec = json.loads(json.dumps(METHODS[name]))
    base = {"method": spec.pop("method", name), "model": str(model_dir), "out_dir": str(out),
            "data": {"task_size": 64, "val_fraction": 0.125},
            "optim": {"lr": 1e-3}, "rollout": {"prompts_per_rollout": 4, "max_new_tokens": 4},
            "train": {"steps": 3, "batch_size": 4, "progress": False, "threads": 1, "peak_flops": 1e12}}
    for section, values in list(spec.items()) + list(changes.items()):
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    return load_config(AlignConfig, None, [], base=base)


def train_losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


@pytest.mark.parametrize("name", list(METHODS))
def test_short_run_matches_golden_curve(name, task_model_dir, tmp_path):
    out = tmp_path / name
    result, summary = run(config(name, task_model_dir, out))
    losses = train_losses(out)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    metric = {"rm": "margin", "dpo": "reward_margin", "kto": "reward_desirable", "ipo": "reward_margin",
              "grpo": "reward", "rloo": "reward", "ppo": "reward"}[name]
    for key in {"rm": ["accuracy"], "dpo": ["reward_accuracy", "reward_ties"], "kto": ["kl"], "ipo": [],
                "grpo": ["kl", "clip_fraction", "entropy", "generation_s"], "rloo": ["dropped_fraction"],
                "ppo": ["value_explained_variance", "kl_coef", "clip_fraction", "entropy"]}[name] + [metric]:
        assert key in records[-1], key
    curve = {"loss": losses, metric: [r[metric] for r in records]}
    published = Path(summary["model"])
    if name == "rm":
        assert load_score_model(published).config.vocab_size > 0
    else:
        assert lmstack.load_model(published).config.vocab_size > 0
    if os.environ.get("LMSTACK_UPDATE_GOLDEN"):
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        golden[name] = curve
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())[name]
    for key, values in golden.items():
        assert curve[key] == pytest.approx(values, rel=2e-3, abs=1e-6), key


@pytest.mark.parametrize("name", ["rm", "ppo"])
def test_resume_through_the_checkpoint_store_is_exact(name, task_model_dir, tmp_path):
    """rm writes sequence-classification checkpoints, ppo the policy plus value_head.safetensors: a run stopped
    at step 2 and resumed gives the uninterrupted run's losses (PPO: 2 steps per rollout, resumed at a boundary)."""
    full = tmp_path / "full"
    run(config(name, task_model_dir, full, train={"steps": 4}))
    part = tmp_path / "part"
    run(config(name, task_model_dir, part, train={"steps": 2}))
    run(config(name, task_model_dir, part, train={"steps": 4}), resume=True)
    resumed = [r["loss"] for r in read_metrics(part / "metrics.jsonl") if r["kind"] == "train"]
    assert resumed[-2:] == pytest.approx(train_losses(full)[-2:], rel=1e-5)


@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_resume_inside_a_rollout_is_exact(name, task_model_dir, tmp_path):
    """Two steps per rollout (PPO: 2 epochs; GRPO: 2 minibatches), stopped after step 3: the checkpoint is inside
    rollout 1, so it keeps that rollout (rollout.safetensors) and the resumed step trains on the same samples
    as the uninterrupted run (regenerating it from the updated policy would not)."""
    rollout = {"epochs": 2} if name == "ppo" else {"minibatches": 2}
    full = tmp_path / "full"
    run(config(name, task_model_dir, full, rollout=rollout, train={"steps": 4}))
    part = tmp_path / "part"
    run(config(name, task_model_dir, part, rollout=rollout, train={"steps": 3}))
    assert (part / "checkpoints" / "step-00000003" / "rollout.safetensors").is_file()
    assert not (full / "checkpoints" / "step-00000004" / "rollout.safetensors").exists()  # at a boundary: none
    run(config(name, task_model_dir, part, rollout=rollout, train={"steps": 4}), resume=True)
    resumed = [r["loss"] for r in read_metrics(part / "metrics.jsonl") if r["kind"] == "train"]
    assert resumed[-1] == pytest.approx(train_losses(full)[-1], rel=1e-5)


def test_precomputed_reference_equals_the_live_reference(task_model_dir, tmp_path):
    live = tmp_path / "live"
    run(config("dpo", task_model_dir, live))
    cached = tmp_path / "cached"
    run(config("dpo", task_model_dir, cached, dpo={"precompute_reference": True}))
    assert train_losses(cached) == pytest.approx(train_losses(live), rel=1e-5)
    cache = cached / "reference_logps.safetensors"
    assert cache.exists()
    stamp = cache.stat().st_mtime_ns
    engine, parts = build(config("dpo", task_model_dir, tmp_path / "cached2", dpo={"precompute_reference": True}))
    batch = engine.batches.micro_batches(0)[0]
    assert batch["ref_logps"].shape == (4, 2)
    assert cache.stat().st_mtime_ns == stamp  # the first run's cache was not touched


def test_failing_reward_functions_drop_samples_and_the_run_goes_on(task_model_dir, tmp_path):
    out = tmp_path / "flaky"
    cfg = config("grpo", task_model_dir, out, grpo={"reward_fns": ["tests.align.test_recipes:flaky"]},
                 rollout={"max_new_tokens": 6, "prompts_per_rollout": 8})
    result, summary = run(cfg)
    rollouts = summary["rollouts"]
    dropped = rollouts["reward_dropped"]
    assert rollouts["dropped"] == sum(dropped.values()) > 0
    assert set(dropped) <= {"raised", "not_finite"}
    if "raised" in dropped:
        assert rollouts["reward_first_error"]["raised"].endswith("ValueError: no sevens")
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert len(records) == 3 and any(r["dropped_fraction"] > 0 for r in records)


def test_cli_with_the_shipped_config(task_model_dir, tmp_path, capsys):
    from lmstack.cli import main
    out = tmp_path / "cli"
    code = main(["align", "dpo", "--config", str(CONFIGS / "align-dpo-sorted-letters.yaml"), f"--model={task_model_dir}",
                 f"--out_dir={out}", "--train.steps=2", "--train.progress=false", "--data.task_size=40",
                 "--train.peak_flops=1e12"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "dpo" and summary["steps"] == 2 and "reward_accuracy" in summary["heldout"]
    assert main(["align", "grpo", "--config", str(CONFIGS / "align-dpo-sorted-letters.yaml")]) == 1  # method mismatch


def test_every_shipped_config_loads():
    for path in sorted(CONFIGS.glob("align-*.yaml")):
        cfg = load_config(AlignConfig, path)
        assert cfg.method in ("rm", "dpo", "ppo", "grpo", "rloo"), path


def test_value_head_policy_generates_like_its_policy(task_model_dir):
    """PPO samples from ValueHeadModel.policy: the plain transformer, unchanged by the wrapper."""
    from lmstack.model.heads import ValueHeadModel
    policy = lmstack.load_model(task_model_dir)
    wrapped = ValueHeadModel(policy)
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(wrapped.policy(ids), policy(ids))


def test_prompts_longer_than_the_context_are_skipped_and_counted(task_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    records = [{"prompt": "12+34=", "answer": 46}, {"prompt": "1+" * 20 + "1=", "answer": 21},
               {"prompt": "5+5=", "answer": 10}]  # the model's context is 24 tokens: the second cannot fit
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = config("grpo", task_model_dir, tmp_path / "long", data={"task": None, "path": str(prompts)})
    engine, parts = build(cfg)
    assert parts.counts["prompts"] == 2 and parts.counts["prompts_too_long"] == 1
    assert "2 prompts; 1 skipped: longer than max_len" in capsys.readouterr().err
    assert [r.prompt for r in parts.source.records] == ["12+34=", "5+5="]
