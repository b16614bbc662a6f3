"""GPTQ, AWQ, SmoothQuant, QAT and mixed precision: their defining properties, checked on real calibration text."""

from __future__ import annotations

import copy

import pytest
import torch

import lmstack
from lmstack.quant.apply import QuantConfig, quantize_model
from lmstack.quant.awq import search_scales
from lmstack.quant.calibration import BlockWalk, calibration_tokens, record_inputs
from lmstack.quant.formats import quantize_rtn
from lmstack.quant.gptq import HessianAccumulator, block_linears, gptq_quantize
from lmstack.quant.linear import KERNEL_DTYPE, IntLinear
from lmstack.quant.mixed import LayerSensitivity, average_bits, choose_bits
from lmstack.quant.qat import FakeQuantLinear, convert_qat, fake_quantize, prepare_qat
from lmstack.quant.scaling import fold_scales, scale_groups
from lmstack.quant.smoothquant import smooth_model


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A small llama trained for 25 steps on the interpreter's docs, with calibration and held-out windows."""
    import pydoc_data.topics

    from lmstack.tokenizer import train_tokenizer

    topics = list(pydoc_data.topics.topics.values())
    tok = train_tokenizer(iter(topics[:40]), "bpe", 400)
    corpus = tmp_path_factory.mktemp("calib") / "calib.txt"
    corpus.write_text("\n\n".join(topics[:60]))
    calib = calibration_tokens(tok, [str(corpus)], n_samples=16, seq_len=64)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # module-scoped: set up before the per-test one-thread fixture
    cfg = lmstack.ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                              intermediate_size=128, max_seq_len=64)
    model = lmstack.Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(25):
        batch = calib[torch.arange(step, step + 8) % 16]
        loss = model(batch[:, :-1], targets=batch[:, 1:]) / batch[:, 1:].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), calib, corpus


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (3, 16, False), (8, None, True), (4, None, False)])
def test_gptq_with_identity_hessian_is_rtn(bits, group, symmetric):
    w = torch.randn(40, 64)
    q = gptq_quantize(w, torch.eye(64), bits, group, symmetric, block_size=16)
    rtn = quantize_rtn(w, bits, group, symmetric)
    assert torch.equal(q.codes, rtn.codes) and torch.equal(q.scales, rtn.scales) and torch.equal(q.zeros, rtn.zeros)


def _layer_inputs(model, calib):
    """{full linear name: its calibration inputs (n, K)} on the full-precision model."""
    walk, found = BlockWalk(model, calib), {}

    def process(index, prefix, block):
        def keep(name, x):
            found.setdefault(prefix + name, []).append(x.reshape(-1, x.shape[-1]))
        record_inputs(block, walk, block_linears(block), keep)

    walk.walk(process)
    return {name: torch.cat(xs) for name, xs in found.items()}


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn_for_every_layer(text_model, act_order):
    model, calib, _ = text_model
    for name, x in _layer_inputs(model, calib).items():
        w = model.get_submodule(name).weight.detach()
        h = HessianAccumulator(x.shape[1])
        h.add(x)
        gptq = gptq_quantize(w, h.hessian(), 3, 32, act_order=act_order).dequantize()
        rtn = quantize_rtn(w, 3, 32).dequantize()
        reference = x @ w.t()
        gptq_error, rtn_error = (x @ gptq.t() - reference).pow(2).sum(), (x @ rtn.t() - reference).pow(2).sum()
        assert gptq_error < rtn_error, name


def test_scale_folding_keeps_the_function(text_model):
    model, calib, _ = text_model
    model = copy.deepcopy(model)
    reference = model(calib[:2])
    for block in model.model.layers:
        for group in scale_groups(block):
            fold_scales(block, group, torch.rand(block.get_submodule(group.consumers[0]).in_features) + 0.5)
    torch.testing.assert_close(model(calib[:2]), reference, rtol=1e-4, atol=1e-4)


def test_awq_scales_protect_salient_channels():
    x = torch.randn(512, 64)
    x[:, :4] *= 30  # four salient input channels, as AWQ observes in real activations
    w = torch.randn(32, 64) * 0.05
    s, alpha = search_scales(x, [w], bits=3, group_size=32)
    assert alpha > 0 and s[:4].min() > s[4:].max()
    awq = quantize_rtn(w * s, 3, 32).dequantize() / s
    rtn = quantize_rtn(w, 3, 32).dequantize()
    assert (x @ awq.t() - x @ w.t()).pow(2).sum() < (x @ rtn.t() - x @ w.t()).pow(2).sum()


def test_smoothquant_migrates_outliers(text_model):
    model, calib, _ = text_model
    model = copy.deepcopy(model)
    with torch.no_grad():  # activation outliers in a few channels, as large LMs have them
        for block in model.model.layers:
            block.input_layernorm.weight[:3] *= 40
            block.self_attn.q_proj.weight[:, :3] /= 40  # same fp function for q; k, v see the outliers' effect
    reference = model(calib[:4])
    smoothed = copy.deepcopy(model)
    smooth_model(smoothed, calib, alpha=0.5)
    torch.testing.assert_close(smoothed(calib[:4]), reference, rtol=1e-3, atol=1e-3)  # fp function unchanged
    errors = {}
    for method in ("dynamic", "smoothquant"):
        m = copy.deepcopy(model)
        quantize_model(m, QuantConfig(method), calib)
        errors[method] = (m(calib[:4]) - reference).pow(2).mean().item()
    assert errors["smoothquant"] < errors["dynamic"]


def test_fake_quant_forward_is_rtn_and_gradient_is_straight_through():
    w = torch.randn(16, 64, requires_grad=True)
    fq = fake_quantize(w, 4, 32)
    assert torch.equal(fq.detach(), quantize_rtn(w.detach(), 4, 32).dequantize())
    fq.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_qat_converts_to_the_model_it_simulated(text_model):
    model, calib, _ = text_model
    model = copy.deepcopy(model)
    names = prepare_qat(model, bits=4, group_size=32)
    assert len(names) == 14 and isinstance(model.model.layers[0].mlp.up_proj, FakeQuantLinear)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)  # a few steps so that the weights move
    for _ in range(3):
        loss = model(calib[:4, :-1], targets=calib[:4, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        simulated = model(calib[:2])
        fake = {name: fake_quantize(model.get_submodule(name).weight, 4, 32) for name in names}
        assert convert_qat(model) == 14
        assert isinstance(model.model.layers[0].mlp.up_proj, IntLinear)
        for name in names:  # the stored int weights are exactly the ones training saw
            assert torch.equal(model.get_submodule(name).int_weight().dequantize(), fake[name])
        # the same function; the int4 kernel takes bf16 activations on CPUs with native bf16 (lmstack.quant.linear)
        tol = 1e-4 if KERNEL_DTYPE == torch.float32 else 0.05
        torch.testing.assert_close(model(calib[:2]), simulated, rtol=tol, atol=tol * simulated.abs().max().item())


def test_mixed_precision_spends_bits_where_they_help_most():
    rows = [LayerSensitivity("a", 100, {3: 0.50, 4: 0.10, 8: 0.0}),
            LayerSensitivity("b", 100, {3: 0.05, 4: 0.02, 8: 0.0}),
            LayerSensitivity("c", 200, {3: 0.20, 4: 0.01, 8: 0.0})]
    chosen = {r.name: r.bits for r in choose_bits(rows, target_bits=3.75)}
    assert chosen == {"a": 4, "b": 3, "c": 4}  # budget 1500 bits: +100 (a), +200 (c) fit; b's gain is least
    assert average_bits(rows) <= 3.75


def test_calibration_errors(tmp_path):
    from lmstack.errors import DataError
    from lmstack.tokenizer import train_tokenizer

    tok = train_tokenizer(iter(["hello world"] * 10), "char", None)
    with pytest.raises(DataError, match="no such file"):
        calibration_tokens(tok, [str(tmp_path / "missing.txt")])
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(DataError, match="need at least 257"):
        calibration_tokens(tok, [str(tmp_path / "short.txt")], seq_len=256)
