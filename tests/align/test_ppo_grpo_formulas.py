"""PPO and GRPO / RLOO formulas on hand-computed cases (trl no longer ships PPO; InstructGPT / trl v0's
definitions are written out here), plus GRPO's group statistics against trl's own `nanstd`."""

from __future__ import annotations

import math

import pytest
import torch

import lmstack
from lmstack.model.heads import ValueHeadModel
from lmstack.train.objectives.grpo import GRPOConfig, GRPOObjective, group_advantages, grpo_token_losses, k3
from lmstack.train.objectives.ppo import (AdaptiveKLController, PPOConfig, PPOObjective, explained_variance, gae,
                                          kl_estimate, masked_whiten, ppo_token_losses, token_rewards)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# ------------------------------------------------------------------------------------------- PPO, rollout side
def test_kl_estimators_by_hand():
    logp, ref = t(math.log(0.5)), t(math.log(0.25))
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx((0.5 - 1) - math.log(0.5))  # rho = 0.25 / 0.5
    assert k3(logp, ref).item() == pytest.approx(0.5 - math.log(0.5) - 1)


def test_token_rewards_put_the_score_on_the_last_completion_token():
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]])
    kl = t(9, 0.1, 0.2, -0.1, 9).expand(2, 5)
    rewards = token_rewards(t(2.0, -1.0), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.stack([t(0, -0.05, -0.1, 0.05 + 2.0, 0), t(0, 0, -0.1 - 1.0, 0, 0)]))


def trl_v0_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """trl v0's compute_advantages loop on one unpadded response, verbatim in spirit."""
    lastgaelam, out = 0.0, []
    gen_len = len(rewards)
    for i in reversed(range(gen_len)):
        nextvalues = values[i + 1] if i < gen_len - 1 else 0.0
        delta = rewards[i] + gamma * nextvalues - values[i]
        lastgaelam = delta + gamma * lam * lastgaelam
        out.append(lastgaelam)
    return out[::-1]


def test_gae_by_hand_and_as_trl_v0():
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    rewards = t(0, -0.05, -0.1, 2.05, 0)[None]
    values = t(9, 0.5, 1.0, 1.5, 9)[None]  # positions outside the completion must not matter
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    a3 = 2.05 - 1.5
    a2 = (-0.1 + 0.9 * 1.5 - 1.0) + 0.72 * a3
    a1 = (-0.05 + 0.9 * 1.0 - 0.5) + 0.72 * a2
    torch.testing.assert_close(advantages, t(0, a1, a2, a3, 0)[None])
    torch.testing.assert_close(returns, t(0, a1 + 0.5, a2 + 1.0, a3 + 1.5, 0)[None])
    assert advantages[0, 1:4].tolist() == pytest.approx(trl_v0_gae([-0.05, -0.1, 2.05], [0.5, 1.0, 1.5], 0.9, 0.8))


def test_whitening_uses_the_unbiased_variance_over_masked_tokens():
    x = t(1, 2, 3, 4, 100)[None]
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    expected = (t(1, 2, 3, 4) - 2.5) / math.sqrt(5 / 3 + 1e-8)
    torch.testing.assert_close(masked_whiten(x, mask)[0, :4], expected)
    assert masked_whiten(x, mask)[0, 4] == 0
    returns, values = t(1, 2, 3, 4)[None], t(1, 2, 3, 4)[None] * 0.5
    var_r, var_diff = 5 / 3, torch.var(t(0.5, 1, 1.5, 2)).item()
    assert explained_variance(values, returns, torch.ones(1, 4)) == pytest.approx(1 - var_diff / var_r)


def test_clipped_policy_and_value_losses_by_hand():
    old = t(0.0, 0.0, 0.0)
    logp = t(math.log(1.5), math.log(0.5), math.log(1.1))
    advantages = t(1.0, -1.0, 1.0)
    values, old_values, returns = t(2.0, 1.3, 1.0), t(1.0, 1.0, 1.0), t(1.5, 2.0, 1.0)
    terms = ppo_token_losses(logp, old, values, old_values, advantages, returns, cliprange=0.2, cliprange_value=0.2)
    # A=+1, ratio 1.5: max(-1.5, -1.2) = -1.2 (clipped); A=-1, ratio 0.5: max(0.5, 0.8) = 0.8 (clipped); 1.1: -1.1
    torch.testing.assert_close(terms["pg"], t(-1.2, 0.8, -1.1))
    torch.testing.assert_close(terms["pg_clipped"], t(1, 1, 0))
    # V 2.0 from 1.0 clipped to 1.2: max(0.25, 0.09) / 2; V 1.3 clipped to 1.2 vs R 2: max(0.49, 0.64) / 2
    torch.testing.assert_close(terms["vf"], t(0.125, 0.32, 0.0))
    torch.testing.assert_close(terms["vf_clipped"], t(0, 1, 0))


def test_adaptive_kl_controller_by_hand():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert controller.update(12.0, n_steps=100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))  # error clipped to 0.2
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert controller.update(5.4, n_steps=100) == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))


def test_ppo_objective_at_the_first_update():
    """ratio 1 and V = V_old: the loss is the token mean of -A + vf_coef * ½(V - R)², and it has the gradient
    of -A · log π (the policy-gradient theorem's estimator)."""
    torch.manual_seed(0)
    policy = lmstack.Transformer(lmstack.preset("llama-tiny", vocab_size=50)).double()
    model = ValueHeadModel(policy).double()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 5] = 0
    targets = torch.full((2, 6), -100)
    targets[0, 2:5], targets[1, 3:4] = ids[0, 3:6], ids[1, 4:5]
    with torch.no_grad():
        logp, _, values = model(ids, mask, targets)
    scored = targets != -100
    advantages = torch.randn(2, 6, dtype=torch.float64) * scored
    returns = values + torch.randn(2, 6, dtype=torch.float64) * scored
    batch = {"input_ids": ids, "attention_mask": mask, "targets": targets, "old_logprobs": logp, "old_values": values,
             "advantages": advantages, "returns": returns}
    loss = PPOObjective(PPOConfig(vf_coef=0.1))(model, batch)
    n = scored.sum()
    expected = ((-advantages + 0.1 * 0.5 * (values - returns) ** 2) * scored).sum() / n
    assert loss.count == n
    assert (loss.total / loss.count).item() == pytest.approx(expected.item(), abs=1e-12)
    assert loss.metrics["clip_fraction"].item() == 0
    # with R = V the value term has no gradient: what is left is the gradient of -A log pi, on every weight
    model.zero_grad()
    PPOObjective(PPOConfig())(model, {**batch, "returns": values}).total.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logp, _, _ = model(ids, mask, targets)
    (-(advantages * logp)[scored].sum()).backward()
    for name, p in model.policy.named_parameters():
        torch.testing.assert_close(ours["policy." + name], p.grad, msg=name)


# ------------------------------------------------------------------------------------------- GRPO / RLOO
def test_group_advantages_by_hand():
    rewards = t(1, 0, 0, 1, 2, 2, 2, 2)
    std = math.sqrt(4 * 0.25 / 3)  # Bessel's correction, as trl
    a = 0.5 / (std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 4, "grpo"), t(a, -a, -a, a, 0, 0, 0, 0))
    torch.testing.assert_close(group_advantages(rewards, 4, "dr_grpo"), t(0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0))
    # leave-one-out: r=1 against (1 + 0 + 0) / 3, r=0 against (1 + 0 + 1) / 3
    torch.testing.assert_close(group_advantages(rewards, 4, "rloo"), t(2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0))


def test_dropped_samples_leave_the_group_statistics():
    rewards = t(1, float("nan"), 0, 1)
    std = math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)
    torch.testing.assert_close(group_advantages(rewards, 4, "grpo"),
                               t(1 / 3 / (std + 1e-4), 0, -2 / 3 / (std + 1e-4), 1 / 3 / (std + 1e-4)))
    torch.testing.assert_close(group_advantages(rewards, 4, "rloo"), t(0.5, 0, -1.0, 0.5))
    # a group with a single valid sample has no baseline: no signal
    torch.testing.assert_close(group_advantages(t(1, float("nan")), 2, "rloo"), t(0, 0))


def test_group_advantages_equal_trl():
    """The same statistics as trl's GRPOTrainer / RLOOTrainer, computed with trl's own nanstd."""
    nanstd = pytest.importorskip("trl.trainer.utils").nanstd
    rewards = torch.tensor([0.3, 1.2, -0.4, 0.9, 2.0, 0.1, 0.1, float("nan"), 0.5, 0.7, 0.2, 0.4])
    grouped = rewards.view(-1, 4)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(4)
    std = nanstd(grouped, dim=1).repeat_interleave(4)
    trl_grpo = torch.nan_to_num((rewards - mean) / (std + 1e-4), nan=0.0)
    torch.testing.assert_close(group_advantages(rewards, 4, "grpo"), trl_grpo)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    trl_rloo = torch.nan_to_num(rewards - ((torch.nansum(grouped, 1, keepdim=True) - grouped) / (counts - 1)).view(-1))
    torch.testing.assert_close(group_advantages(rewards, 4, "rloo"), trl_rloo)


def test_grpo_token_loss_by_hand():
    logp, old = t(math.log(1.3), math.log(0.7), math.log(1.1))[None], t(0.0, 0.0, 0.0)[None]
    ref = t(0.0, 0.0, 0.0)[None]
    terms = grpo_token_losses(logp.expand(2, 3), old.expand(2, 3), ref.expand(2, 3), t(1.0, -1.0), 0.2, 0.28, 0.1)
    kl = k3(logp, ref)[0]
    # A=+1: -min(1.3, 1.28), -min(0.7, 0.7), -min(1.1, 1.1); A=-1: -min(-1.3, -1.2), -min(-0.7, -0.8), -min(-1.1, -1.1)
    torch.testing.assert_close(terms["loss"][0], t(-1.28, -0.7, -1.1) + 0.1 * kl)
    torch.testing.assert_close(terms["loss"][1], t(1.3, 0.8, 1.1) + 0.1 * kl)
    torch.testing.assert_close(terms["clipped"], torch.tensor([[1.0, 0, 0], [0, 1, 0]], dtype=torch.float64))


@pytest.mark.parametrize("aggregation,total,count", [
    ("sequence", (1 + 2) / 2 + (3 + 4 + 5 + 6) / 4, 2),   # mean per sequence, summed
    ("token", 1 + 2 + 3 + 4 + 5 + 6, 6),                   # every token
    ("fixed", (1 + 2 + 3 + 4 + 5 + 6) / 8, 2),             # Dr. GRPO: by max_new_tokens, per sequence
])
def test_loss_aggregation_by_hand(aggregation, total, count):
    objective = GRPOObjective(GRPOConfig(loss_aggregation=aggregation), max_new_tokens=8)
    per_token = t(1, 2, 0, 0, 3, 4, 5, 6).view(2, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    dropped = torch.zeros(1, 4, dtype=torch.float64)
    per_token, mask = torch.cat([per_token, dropped + 9]), torch.cat([mask, dropped])  # a dropped row scores nothing
    assert objective.aggregate(per_token, mask).item() == pytest.approx(total)
    assert int(objective.count(mask)) == count


def test_grpo_objective_at_the_first_update_is_the_advantage_weighted_likelihood():
    torch.manual_seed(0)
    model = lmstack.Transformer(lmstack.preset("llama-tiny", vocab_size=50)).double()
    ids = torch.randint(0, 50, (3, 5))
    targets = torch.full((3, 5), -100)
    targets[0, 1:4], targets[1, 2:4], targets[2, 3:4] = ids[0, 2:5], ids[1, 3:5], ids[2, 4:5]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "targets": targets,
             "advantages": t(0.5, -1.0, 2.0)}
    loss = GRPOObjective(GRPOConfig(beta=0.0, loss_aggregation="token"), max_new_tokens=4)(model, batch)
    # rho = 1 everywhere: the loss value is -sum(A) over tokens; the gradient is that of -A log pi
    scored = targets != -100
    assert loss.mean().item() == pytest.approx(-(t(0.5, -1.0, 2.0)[:, None] * scored).sum().item() / 6)
    assert loss.metrics["clip_fraction"].item() == 0
