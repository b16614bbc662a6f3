"""The MoE layer inside training: router losses through the objective's Loss, gradients, metrics."""

from __future__ import annotations

import pytest
import torch

import lmstack
from lmstack.model.moe import moe_layers
from lmstack.train.objectives import causal_lm_loss
from lmstack.train.objectives.moe import router_losses


def _model(**moe):
    torch.manual_seed(0)
    config = lmstack.preset("mixtral-tiny", vocab_size=97, moe=dict(num_experts=4, num_experts_per_tok=2,
                                                                    router_aux_loss_coef=0.1, router_z_loss_coef=0.01,
                                                                    **moe))
    return lmstack.Transformer(config).train()


def test_router_losses_enter_the_total_scaled_by_the_count():
    """total = CE_sum + count * (aux_coef * aux + z_coef * z); aux is transformers' load_balancing_loss_func."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = _model()
    ids = torch.randint(0, 97, (3, 12))
    targets = torch.randint(0, 97, (3, 12))
    targets[0, :4] = -100
    loss = causal_lm_loss(model, ids, targets)
    term = router_losses(model, loss.count)
    logits = tuple(layer.router_logits.detach() for layer in moe_layers(model))
    aux = load_balancing_loss_func(logits, num_experts=4, top_k=2)
    z = torch.cat([torch.logsumexp(x, -1) ** 2 for x in logits]).mean()
    count = int(loss.count)
    assert count == 32
    assert term.total.item() == pytest.approx(count * (0.1 * aux.item() + 0.01 * z.item()), rel=1e-5)
    assert term.metrics["moe_aux_loss"].item() / count == pytest.approx(aux.item(), rel=1e-5)
    shares = [term.metrics[f"moe_tokens_e{e}"].item() / count for e in range(4)]
    assert sum(shares) == pytest.approx(2.0, rel=1e-5)  # k = 2 assignments per token
    # the router's gradient includes the auxiliary term
    combined = loss + term
    router = moe_layers(model)[0].gate.weight
    (grad_total,) = torch.autograd.grad(combined.total, router, retain_graph=True)
    (grad_ce,) = torch.autograd.grad(loss.total, router, retain_graph=True)
    (grad_aux,) = torch.autograd.grad(term.total, router)
    assert torch.allclose(grad_total, grad_ce + grad_aux, atol=1e-6) and grad_aux.abs().sum() > 0


def test_validation_and_dense_models_add_nothing():
    model = _model().eval()
    ids = torch.randint(0, 97, (2, 8))
    loss = causal_lm_loss(model, ids, ids)
    assert router_losses(model, loss.count).total.item() == 0.0
    dense = lmstack.Transformer(lmstack.preset("llama-tiny")).train()
    loss = causal_lm_loss(dense, ids, ids)
    assert (loss + router_losses(dense, loss.count)).total.item() == loss.total.item()


def test_capacity_reports_dropped_assignments():
    model = _model(capacity_factor=0.5)
    ids = torch.randint(0, 97, (2, 16))
    loss = causal_lm_loss(model, ids, ids)
    term = router_losses(model, loss.count)
    # capacity 0.5 x fair share: at least half of the N*k assignments are dropped, per token >= k/2 = 1
    assert term.metrics["moe_dropped"].item() / int(loss.count) >= 1.0


def test_configs_transformers_cannot_express_are_saved_as_lmstack(tmp_path):
    """Experts under family llama, a mixtral without experts: written as model_type "lmstack", read back exactly."""
    import json

    for config in (lmstack.preset("llama-tiny", moe=dict(num_experts=4)), lmstack.preset("llama-tiny", family="mixtral")):
        model = lmstack.Transformer(config)
        lmstack.save_model(model, tmp_path / config.family)
        assert json.loads((tmp_path / config.family / "config.json").read_text())["model_type"] == "lmstack"
        assert lmstack.load_model(tmp_path / config.family).config == config
