"""Mixture of experts: Mixtral and Qwen2-MoE logits against transformers on tiny random configs, both
directions, a left-padded batch; the load-balancing loss against transformers' aux_loss."""

from __future__ import annotations

import json

import pytest
import torch

import lmstack
from lmstack.model.moe import load_balancing_loss, moe_layers

TOL = 1e-4


def build_hf_moe(family: str, directory, **overrides):
    import transformers

    torch.manual_seed(1234)
    common = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, num_experts_per_tok=2)
    if family == "mixtral":
        config = transformers.MixtralConfig(**{**common, "num_local_experts": 4, "sliding_window": 9, **overrides})
        model = transformers.MixtralForCausalLM(config)
    else:
        config = transformers.Qwen2MoeConfig(**{**common, "num_experts": 6, "moe_intermediate_size": 40,
                                                "shared_expert_intermediate_size": 56, **overrides})
        model = transformers.Qwen2MoeForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # spread the router so experts differ per token
    model.eval().save_pretrained(directory)
    return model


def _left_padded(lengths=(11, 6, 3)):
    T = max(lengths)
    ids = torch.randint(0, 211, (len(lengths), T))
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, T - n:] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("family,overrides", [("mixtral", {}), ("qwen2_moe", {}),
                                              ("qwen2_moe", {"norm_topk_prob": True})])
def test_moe_logits_match_transformers_both_ways(family, overrides, tmp_path):
    import transformers

    reference = build_hf_moe(family, tmp_path / "hf", **overrides)
    model = lmstack.load_model(tmp_path / "hf").eval()
    assert model.config.family == family and model.config.moe.num_experts == (4 if family == "mixtral" else 6)
    assert model.config.moe.normalize_topk == (family == "mixtral" or bool(overrides))
    lmstack.save_model(model, tmp_path / "out")
    written = json.loads((tmp_path / "out/config.json").read_text())
    assert written["model_type"] == family
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids, mask, positions = _left_padded()
    real = mask.bool()
    with torch.no_grad():
        got = model(ids, attention_mask=mask)
        for other in (reference, reloaded):
            expected = other(ids, attention_mask=mask, position_ids=positions).logits
            assert (got[real] - expected[real]).abs().max().item() <= TOL
        # several experts really are used, and a padded row equals the row alone
        chosen = moe_layers(model)[0].route(model.model.embed_tokens(ids[:1]).reshape(-1, 64))[1]
        assert chosen.unique().numel() > 2
        assert (got[2, -3:] - model(ids[2:3, -3:])[0]).abs().max().item() <= TOL


def test_load_balancing_loss_equals_transformers_aux_loss(tmp_path):
    reference = build_hf_moe("mixtral", tmp_path / "hf")
    model = lmstack.load_model(tmp_path / "hf").eval()
    ids = torch.randint(0, 211, (2, 13))
    with torch.no_grad():
        expected = reference(ids, output_router_logits=True).aux_loss
        model(ids)
        got, share = load_balancing_loss([m.router_logits for m in moe_layers(model)], top_k=2)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert share.sum().item() == pytest.approx(2.0)  # k assignments per token


def test_uniform_router_gives_k_and_capacity_drops_overflow():
    config = lmstack.preset("mixtral-tiny")
    model = lmstack.Transformer(config).train()
    layer = moe_layers(model)[0]
    logits = torch.zeros(10, config.moe.num_experts)
    assert load_balancing_loss([logits], top_k=2)[0].item() == pytest.approx(2.0)
    # capacity: every token routed to experts 0 and 1 (a router biased hard towards them)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[0] = 1.0
        layer.gate.weight[1] = 0.5
    layer.capacity_factor = 1.0
    x = torch.rand(2, 8, config.hidden_size) + 0.1  # positive inputs: experts 0, 1 win for every token
    layer(x)
    capacity = -(-16 * 2 // config.moe.num_experts)  # ceil(1.0 * N * k / E)
    assert layer.dropped == 2 * (16 - capacity)
    layer.eval()
    layer(x)
    assert layer.dropped == 0  # inference never drops


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_greedy_generation_equals_transformers(family, tmp_path):
    """lmstack.generate on a batch of prompts of different lengths (each row at its own cache positions)
    gives transformers' greedy tokens for each prompt alone."""
    reference = build_hf_moe(family, tmp_path / "hf")
    model = lmstack.load_model(tmp_path / "hf").eval()
    prompts = [torch.randint(0, 211, (n,)).tolist() for n in (7, 3)]
    with torch.no_grad():
        expected = [reference.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                       pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    got = lmstack.generate(model, None, prompts, max_new_tokens=12, ignore_eos=True)
    assert got.token_ids == expected
