"""A LoRA policy (lmstack.adapters) in the alignment recipe: its reference is the same weights with the adapter
switched off (no second copy), which must score exactly as a frozen copy of the starting model does; only the
adapter trains; what the run publishes (OUT/adapter, OUT/model merged) gives the trained policy's logits; and
the PPO store with an adapter resumes exactly."""

from __future__ import annotations

import pytest
import torch

import lmstack
from lmstack.adapters import LoraConfig, apply_lora, is_adapter_parameter, save_adapter
from lmstack.train.metrics import read_metrics
from lmstack.train.recipes.align import build, run
from lmstack.train.reference import AdapterDisabledReference, FrozenReference
from tests.align.test_recipes import config, train_losses

LORA = {"r": 4, "lora_alpha": 8.0, "lora_dropout": 0.1}  # dropout: the reference must run without it


def _randomised(model: torch.nn.Module, seed: int) -> None:
    """Non-zero adapter weights (B starts at zero: policy = reference until it trains)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_parameter(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_adapter_disabled_reference_scores_as_the_frozen_base(task_model_dir):
    base = lmstack.load_model(task_model_dir)
    frozen = FrozenReference(base)
    policy = lmstack.load_model(task_model_dir)
    apply_lora(policy, LoraConfig(**LORA))
    _randomised(policy, 0)
    policy.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 20, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    targets = torch.full_like(ids, -100)
    targets[:, 3:8] = ids[:, 4:9]
    targets[1, 5:] = -100
    ours = AdapterDisabledReference().token_logprobs(policy, ids, mask, targets)
    assert policy.training  # its mode is given back
    torch.testing.assert_close(ours, frozen.token_logprobs(None, ids, mask, targets), rtol=0, atol=1e-6)
    from lmstack.train.objectives.logprobs import token_logprobs
    with torch.no_grad():
        adapted = token_logprobs(policy.eval(), ids, mask, targets)[0]
    assert (adapted - ours).abs().max() > 1e-3  # the adapter matters: the reference is not the policy


def test_lora_dpo_trains_the_adapter_only_against_the_base(task_model_dir, tmp_path):
    out = tmp_path / "lora-dpo"
    cfg = config("dpo", task_model_dir, out, lora=LORA, train={"steps": 4})
    engine, parts = build(cfg)
    assert isinstance(parts.objective.reference, AdapterDisabledReference)  # no copy of the model
    assert 0 < parts.counts["trainable_parameters"] < parts.counts["parameters"] / 4
    start = {n: p.detach().clone() for n, p in parts.model.named_parameters()}
    engine.fit()
    trained = dict(parts.model.named_parameters())
    for name, before in start.items():
        if not is_adapter_parameter(name):
            assert torch.equal(before, trained[name]), f"{name}: a base weight changed"
    assert all(not torch.equal(start[n], p) for n, p in trained.items() if "lora_B" in n)
    # the live adapter-disabled reference equals a frozen copy of the starting model on a batch, mid-training
    batch = engine.batches.micro_batches(7)[0]
    frozen = FrozenReference(lmstack.load_model(task_model_dir))
    with torch.no_grad():
        ours = parts.objective(parts.model.eval(), batch)
        peer = type(parts.objective)(parts.objective.cfg, frozen)(parts.model, batch)
    assert float(ours.total) == pytest.approx(float(peer.total), rel=1e-6)
    assert float(ours.metrics["reward_margin"]) == pytest.approx(float(peer.metrics["reward_margin"]), abs=1e-6)


def test_lora_runs_publish_the_adapter_and_the_merged_model(task_model_dir, tmp_path):
    out = tmp_path / "lora-grpo"
    result, summary = run(config("grpo", task_model_dir, out, lora=LORA))  # grpo.beta 0.1: the reference runs
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # adapter B = 0 at the start: policy = reference
    merged = lmstack.load_model(out / "model")
    adapted = lmstack.load_model(task_model_dir, adapter=out / "adapter")
    ids = torch.randint(4, 20, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids), adapted.eval()(ids), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged(ids), lmstack.load_model(task_model_dir).eval()(ids), atol=1e-4)


def test_lora_ppo_resumes_exactly_and_starts_from_a_merged_sft_adapter(task_model_dir, tmp_path):
    sft = lmstack.load_model(task_model_dir)
    apply_lora(sft, LoraConfig(r=2, lora_alpha=4.0))
    _randomised(sft, 3)
    save_adapter(sft, tmp_path / "sft-adapter")
    changes = {"adapter": str(tmp_path / "sft-adapter"), "lora": LORA}
    full = tmp_path / "full"
    run(config("ppo", task_model_dir, full, train={"steps": 4}, **changes))
    part = tmp_path / "part"
    run(config("ppo", task_model_dir, part, train={"steps": 2}, **changes))
    run(config("ppo", task_model_dir, part, train={"steps": 4}, **changes), resume=True)
    assert train_losses(part)[-2:] == pytest.approx(train_losses(full)[-2:], rel=1e-5)
    assert (part / "checkpoints").is_dir()
    # the reference is the SFT model (base + SFT adapter, merged), not the base
    engine, parts = build(config("ppo", task_model_dir, tmp_path / "ref", **changes))
    ids = torch.randint(4, 20, (2, 8), generator=torch.Generator().manual_seed(0))
    targets = torch.cat([torch.full((2, 3), -100), ids[:, 4:], torch.full((2, 1), -100)], 1)
    mask = torch.ones_like(ids)
    reference = parts.source.prepare.reference.token_logprobs(parts.model.policy, ids, mask, targets)
    peer = FrozenReference(sft).token_logprobs(None, ids, mask, targets)
    torch.testing.assert_close(reference, peer, rtol=0, atol=1e-5)


def test_lora_reward_model_is_a_peft_seq_cls_adapter_with_the_same_scores(task_model_dir, tmp_path):
    """`align rm` with `lora:`: only the body's adapters and the score head train; OUT/adapter is a peft SEQ_CLS
    adapter (modules_to_save: score) that transformers + peft put on the starting LM with the same scores, and
    OUT/model the merged sequence-classification directory; a run stopped and resumed is exact."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lmstack.interop.hf_heads import load_score_model
    from lmstack.tokenizer import Tokenizer
    from lmstack.train.recipes.align import publish

    out = tmp_path / "rm"
    engine, parts = build(config("rm", task_model_dir, out, lora=LORA, train={"steps": 4}))
    model = parts.model
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trains and all("lora_" in n or n == "score.weight" for n in trains)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trains}
    score_before = model.score.weight.detach().clone()
    engine.fit()
    publish(engine, parts)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not torch.equal(model.score.weight, score_before)

    pad = Tokenizer.load(task_model_dir).pad_token_id
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(pad + 1, 20, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = pad, 0  # right padding: the score is read at the last real token
    with torch.no_grad():
        ours = model.eval()(ids, mask)
        merged = load_score_model(out / "model").eval()(ids, mask)
        base = transformers.AutoModelForSequenceClassification.from_pretrained(task_model_dir, num_labels=1,
                                                                                pad_token_id=pad)
        theirs = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
        assert type(theirs).__name__ == "PeftModelForSequenceClassification"
        theirs = theirs(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(merged, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    part = tmp_path / "part"
    run(config("rm", task_model_dir, part, lora=LORA, train={"steps": 2}))
    run(config("rm", task_model_dir, part, lora=LORA, train={"steps": 4}), resume=True)
    resumed = [r["loss"] for r in read_metrics(part / "metrics.jsonl") if r["kind"] == "train"]
    assert resumed[-2:] == pytest.approx(train_losses(out)[-2:], rel=1e-5)


def test_reward_models_refuse_an_sft_adapter(task_model_dir, tmp_path):
    from lmstack.errors import ConfigError
    with pytest.raises(ConfigError, match="align rm starts from `model` alone"):
        build(config("rm", task_model_dir, tmp_path / "rm", adapter=str(tmp_path / "sft-adapter")))


def test_lora_precomputed_reference_is_the_base(task_model_dir, tmp_path):
    engine, parts = build(config("dpo", task_model_dir, tmp_path / "cached", lora=LORA,
                                 dpo={"precompute_reference": True}))
    assert parts.objective.reference is None  # scored once, then not kept
    batch = engine.batches.micro_batches(0)[0]
    frozen = FrozenReference(lmstack.load_model(task_model_dir))
    sums = frozen.token_logprobs(None, batch["input_ids"], batch["attention_mask"], batch["targets"]).sum(-1)
    B = batch["ref_logps"].shape[0]
    torch.testing.assert_close(batch["ref_logps"], torch.stack([sums[:B], sums[B:]], 1), rtol=0, atol=1e-5)



@pytest.mark.slow
def test_shipped_lora_dpo_config_raises_the_chosen_answers(tmp_path):
    """The LoRA DPO instability, as a test: with the adapter alone (the old config) the held-out chosen answers'
    log-probability fell with the rejected ones, the samples stopped being letters and accuracy stayed ~0.8.
    The shipped config (answer-token rows of the tied head + dpo.sft_weight) must separate the pairs AND leave
    the chosen answers more likely than the SFT model had them, with samples that follow the rule far more."""
    from lmstack.align.task_models import sample_answers, train_task_model
    from lmstack.align.tasks import is_sorted_answer, sorted_letters_prompts
    from lmstack.schema import load_config
    from lmstack.train.recipes.align import AlignConfig
    from tests.align.test_recipes import CONFIGS

    sft = train_task_model("sorted_letters", tmp_path / "sft", steps=300, seed=0)
    cfg = load_config(AlignConfig, CONFIGS / "align-dpo-sorted-letters-lora.yaml",
                      [f"--model={sft}", f"--out_dir={tmp_path / 'dpo'}", "--train.progress=false"])
    _, summary = run(cfg)
    held = summary["heldout"]  # reward_chosen = beta * (log pi - log pi_ref)(chosen): > 0 means more likely
    assert held["reward_accuracy"] >= 0.9 and held["reward_chosen"] > 0, held
    from lmstack.tokenizer import Tokenizer
    tokenizer = Tokenizer.load(sft)
    prompts = [r["prompt"] for r in sorted_letters_prompts(200, seed=100)]

    def rule(model) -> float:
        answers = sample_answers(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, seed=0)
        return sum(map(is_sorted_answer, answers)) / len(answers)
    assert rule(lmstack.load_model(summary["model"]).eval()) >= rule(lmstack.load_model(sft).eval()) + 0.3
