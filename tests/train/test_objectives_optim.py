"""Objectives, optimizer groups and LR schedules against hand-computed references."""

from __future__ import annotations

import math

import pytest
import torch

from lmstack import Transformer, preset
from lmstack.train.config import OptimConfig, ScheduleConfig
from lmstack.train.objectives import causal_lm_loss, cross_entropy
from lmstack.train.optim import build_optimizer, parameter_groups
from lmstack.train.schedule import lr_at


def _reference_ce(logits: torch.Tensor, targets: torch.Tensor, ignore: int) -> tuple[float, float]:
    """Sum and mean of -log p(target) written out with exp/log in float64, skipping ignored positions."""
    total, count = 0.0, 0
    for row, target in zip(logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1)):
        if target.item() == ignore:
            continue
        total += -(row[target] - torch.log(torch.exp(row).sum())).item()
        count += 1
    return total, total / max(count, 1)


def test_cross_entropy_matches_hand_computed_with_ignore_index():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 1] = targets[1, 4] = -100
    ref_sum, ref_mean = _reference_ce(logits, targets, -100)
    assert cross_entropy(logits, targets).item() == pytest.approx(ref_mean, rel=1e-6)
    assert cross_entropy(logits, targets, reduction="sum").item() == pytest.approx(ref_sum, rel=1e-6)
    targets[:] = 7
    targets[0, 0] = 3
    ref_sum, ref_mean = _reference_ce(logits, targets, 7)
    assert cross_entropy(logits, targets, ignore_index=7).item() == pytest.approx(ref_mean, rel=1e-6)


def test_cross_entropy_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    loss = cross_entropy(logits, torch.full((1, 3), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_cross_entropy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="disagree"):
        cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_causal_lm_loss_equals_cross_entropy_of_model_logits():
    model = Transformer(preset("llama-tiny"))
    ids = torch.randint(0, 512, (2, 9))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    ref_sum, ref_mean = _reference_ce(model(inputs).detach(), targets, -100)
    loss = causal_lm_loss(model, inputs, targets)
    assert loss.total.item() == pytest.approx(ref_sum, rel=1e-5)
    assert int(loss.count) == targets.numel()
    assert loss.mean().item() == pytest.approx(ref_mean, rel=1e-5)
    targets = targets.clone()
    targets[0, :3] = -100
    ref_sum, _ = _reference_ce(model(inputs).detach(), targets, -100)
    loss = causal_lm_loss(model, inputs, targets)
    assert loss.total.item() == pytest.approx(ref_sum, rel=1e-5) and int(loss.count) == targets.numel() - 3


def test_parameter_groups_no_decay_for_norms_biases_embeddings():
    model = Transformer(preset("gpt2", vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
                                intermediate_size=64, max_seq_len=16, bos_token_id=63, eos_token_id=63))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = parameter_groups(model, OptimConfig())
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "model.layers.0.self_attn.q_proj.weight" in decay_names
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.input_layernorm.weight",
            "model.norm.bias", "model.embed_tokens.weight", "model.embed_positions.weight"} <= no_decay_names
    assert all(n.endswith("weight") and "norm" not in n and "embed" not in n for n in decay_names)
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay_names) + len(no_decay_names) == n_unique  # tied lm_head counted once
    _, no_decay = parameter_groups(model, OptimConfig(decay_embeddings=True))
    assert "model.embed_tokens.weight" not in {names[id(p)] for p in no_decay["params"]}


def test_parameter_groups_skip_frozen_and_fail_when_nothing_trains():
    model = Transformer(preset("llama-tiny"))
    for name, p in model.named_parameters():
        p.requires_grad = "mlp" in name
    groups = parameter_groups(model, OptimConfig())
    assert sum(len(g["params"]) for g in groups) == 3 * len(model.model.layers)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, OptimConfig())  # checked on the groups, whichever function built them


def test_adamw_step_is_decoupled_weight_decay():
    """One AdamW step by hand: p <- p - lr*wd*p - lr * m_hat / (sqrt(v_hat) + eps)."""
    lin = torch.nn.Linear(3, 2, bias=True)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    cfg = OptimConfig(lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5)
    opt = build_optimizer(lin, cfg)
    lin(torch.ones(1, 3)).sum().backward()
    gw, gb = lin.weight.grad.clone(), lin.bias.grad.clone()
    opt.step()
    # after one step m_hat = g and v_hat = g^2, so the Adam update is g / (|g| + eps)
    expected_w = w0 * (1 - 0.1 * 0.5) - 0.1 * gw / (gw.abs() + 1e-8)
    expected_b = b0 - 0.1 * gb / (gb.abs() + 1e-8)  # bias: no decay
    torch.testing.assert_close(lin.weight.detach(), expected_w)
    torch.testing.assert_close(lin.bias.detach(), expected_b)


def _nanogpt_cosine(it: int, lr: float = 1e-3, warmup: int = 100, decay: int = 2000, min_lr: float = 1e-4) -> float:
    """nanoGPT's get_lr after warmup (train.py)."""
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@pytest.mark.parametrize("step", [100, 101, 500, 1050, 1999])
def test_cosine_matches_nanogpt(step: int):
    cfg = ScheduleConfig(kind="cosine", warmup_steps=100, decay_steps=2000, min_lr=1e-4)
    assert lr_at(step, 1e-3, cfg, total_steps=2000) == pytest.approx(_nanogpt_cosine(step), rel=1e-12)


def test_schedules_shapes():
    cos = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr=0.1)
    assert lr_at(0, 1.0, cos, 110) == pytest.approx(0.1)
    assert lr_at(9, 1.0, cos, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, cos, 110) == pytest.approx(0.55)  # half way: the mean of peak and min
    assert lr_at(110, 1.0, cos, 110) == lr_at(500, 1.0, cos, 110) == 0.1
    lin = ScheduleConfig(kind="linear", warmup_steps=0)
    assert [lr_at(s, 1.0, lin, 4) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    wsd = ScheduleConfig(kind="wsd", warmup_steps=2, wsd_decay_fraction=0.25)
    lrs = [lr_at(s, 1.0, wsd, 10) for s in range(11)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2:8] == [1.0] * 6
    assert lrs[8:] == [1.0, 0.5, 0.0]
    const = ScheduleConfig(kind="constant", warmup_steps=0)
    assert lr_at(10**6, 2.0, const, 10) == 2.0


def test_schedule_config_validation_names_the_key():
    with pytest.raises(ValueError, match="schedule.decay_steps"):
        ScheduleConfig(warmup_steps=10, decay_steps=5)
