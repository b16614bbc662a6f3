"""The adaptive softmax head against torch's AdaptiveLogSoftmaxWithLoss, and inside the Transformer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lmstack
from lmstack.errors import ConfigError
from lmstack.model.adaptive_softmax import AdaptiveSoftmaxHead


def test_head_equals_torch_adaptive_log_softmax():
    head = AdaptiveSoftmaxHead(32, 500, [20, 100, 300], div_value=2.0)
    reference = nn.AdaptiveLogSoftmaxWithLoss(32, 500, [20, 100, 300], div_value=2.0)
    reference.load_state_dict(head.state_dict())  # same names and shapes
    hidden = torch.randn(64, 32)
    targets = torch.cat([torch.randint(0, 20, (40,)), torch.randint(20, 500, (24,))])
    logp = head(hidden)
    assert torch.allclose(logp, reference.log_prob(hidden), atol=1e-5)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(64), atol=1e-5)
    out = reference(hidden, targets)
    assert head.loss(hidden, targets).item() == pytest.approx(out.loss.item() * 64, rel=1e-5)
    targets[::3] = -100
    kept = targets != -100
    assert head.loss(hidden, targets).item() == pytest.approx(reference(hidden[kept], targets[kept]).loss.item()
                                                              * int(kept.sum()), rel=1e-5)
    # gradients of the summed loss equal torch's
    hidden.requires_grad_(True)
    (grad,) = torch.autograd.grad(head.loss(hidden, targets), hidden)
    (expected,) = torch.autograd.grad(reference(hidden[kept], targets[kept]).loss * int(kept.sum()), hidden)
    assert torch.allclose(grad, expected, atol=1e-5)


def test_transformer_with_adaptive_head_trains_generates_and_saves(tmp_path):
    config = lmstack.preset("llama-tiny", vocab_size=300, tie_word_embeddings=False, head_cutoffs=[40, 150])
    model = lmstack.Transformer(config)
    ids = torch.randint(0, 300, (2, 10))
    targets = torch.randint(0, 300, (2, 10))
    summed = model(ids, targets=targets)
    log_probs = model(ids)  # (B, T, V) log-probabilities
    expected = -log_probs.gather(-1, targets[..., None]).sum()
    assert summed.item() == pytest.approx(expected.item(), rel=1e-5)
    summed.backward()
    assert model.lm_head.tail[1][0].weight.grad is not None
    out = lmstack.generate(model.eval(), None, [[1, 2, 3]], max_new_tokens=4)
    assert len(out.token_ids[0]) == 4
    lmstack.save_model(model, tmp_path / "a")
    again = lmstack.load_model(tmp_path / "a")
    assert again.config.head_cutoffs == [40, 150]
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_adaptive_head_cannot_be_tied():
    with pytest.raises(ConfigError, match="tie"):
        lmstack.preset("llama-tiny", head_cutoffs=[40, 150])
