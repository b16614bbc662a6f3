"""Integer formats (RTN) against torchao's affine quantization primitives and hand-computed values; the
quantized linears' CPU kernels against dequantize-then-matmul; a quantized directory saved and loaded."""

from __future__ import annotations

import json

import pytest
import torch

import lmstack
from lmstack.errors import CheckpointError, ConfigError
from lmstack.quant.apply import QuantConfig, quantize_model
from lmstack.quant.checkpoint import save_quantized
from lmstack.quant.formats import pack, quantize_rtn, unpack
from lmstack.quant.linear import KERNEL_DTYPE, Int8DynamicLinear, IntLinear


def test_hand_computed_group():
    w = torch.tensor([[-1.0, 0.0, 0.6, 2.0]])
    q = quantize_rtn(w, bits=4, group_size=4, symmetric=False)
    # min -1, max 2: scale 3/15 = 0.2, zero round(1/0.2) = 5; codes round(w/0.2) + 5
    assert q.scales.item() == pytest.approx(0.2) and q.zeros.item() == 5
    assert q.codes.tolist() == [[0, 5, 8, 15]]
    s = quantize_rtn(w, bits=4, group_size=4, symmetric=True)
    # symmetric: scale = 2 / 7.5, zero 8
    assert s.scales.item() == pytest.approx(2 / 7.5) and s.zeros.item() == 8
    assert s.codes.tolist() == [[4, 8, 10, 15]]  # round(-3.75) = -4, round(2.25) = 2, round(7.5) = 8 -> clamp 15


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_pack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (5, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (5, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits, 64), codes)
    if bits == 4:
        assert packed[0, 0].item() == codes[0, 0].item() | codes[0, 1].item() << 4  # element 0 in the low nibble


@pytest.fixture(scope="module")
def torchao_primitives():
    return pytest.importorskip("torchao.quantization.quant_primitives")


@pytest.mark.parametrize("bits,group,symmetric", [(8, None, True), (8, None, False), (4, 64, False), (4, 32, True),
                                                   (3, 64, False)])
def test_rtn_equals_torchao(torchao_primitives, bits, group, symmetric):
    ao = torchao_primitives
    w = torch.randn(48, 128) * 0.05
    w[3] = 0.0  # an all-zero row: the scale's floor
    q = quantize_rtn(w, bits, group, symmetric)
    block = (1, group or 128)
    if symmetric:
        mapping, qmin, qmax, dtype = ao.MappingType.SYMMETRIC, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, torch.int8
    else:
        mapping, qmin, qmax, dtype = ao.MappingType.ASYMMETRIC, 0, 2**bits - 1, torch.uint8
    scale, zero = ao.choose_qparams_affine(w, mapping, block, dtype, qmin, qmax)
    codes = ao.quantize_affine(w, block, scale, zero, dtype, qmin, qmax)
    shift = 2 ** (bits - 1) if symmetric else 0  # torchao's signed symmetric codes; ours are unsigned (+ 2^(b-1))
    assert torch.equal(q.scales.view(-1), scale.view(-1))
    assert torch.equal(q.zeros.view(-1).int(), zero.view(-1).int() + shift)
    assert torch.equal(q.codes.int(), codes.int() + shift)
    assert torch.equal(q.dequantize(), ao.dequantize_affine(codes, block, scale, zero, dtype, qmin, qmax))


@pytest.mark.parametrize("bits,group,symmetric,kernel", [(8, None, True, "int8"), (4, 32, False, "int4"),
                                                          (4, 128, True, "int4"), (8, 64, False, "dequantize"),
                                                          (3, 64, False, "dequantize")])
def test_int_linear_kernels_match_dequantized_matmul(bits, group, symmetric, kernel):
    w, b = torch.randn(96, 256) * 0.05, torch.randn(96)
    q = quantize_rtn(w, bits, group, symmetric)
    layer = IntLinear.from_weight(q, b)
    assert layer.kernel == kernel
    bf16 = kernel != "dequantize" and KERNEL_DTYPE == torch.bfloat16  # the kernels' activations (see linear.py)
    for x in (torch.randn(1, 1, 256), torch.randn(3, 7, 256)):
        x_in = x.to(torch.bfloat16).float() if bf16 else x
        expected = x_in @ q.dequantize().t() + b
        tol = 2e-2 if bf16 else 2e-4  # bf16 products and output: 8 bits of mantissa
        torch.testing.assert_close(layer(x), expected, rtol=tol, atol=tol)


def test_w8a8_linear_error_is_small():
    w, x = torch.randn(64, 128) * 0.05, torch.randn(5, 128)
    layer = Int8DynamicLinear.from_float(w)
    error = (layer(x) - x @ w.t()).abs().max() / (x @ w.t()).abs().max()
    assert 0 < error < 0.02


@pytest.fixture
def tiny():
    cfg = lmstack.ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              intermediate_size=128, max_seq_len=64)
    return lmstack.Transformer(cfg).eval()


@pytest.mark.parametrize("cfg", [QuantConfig("rtn", 8, None, True), QuantConfig("rtn", 4, 32),
                                 QuantConfig("rtn", 3, 32), QuantConfig("nf4"), QuantConfig("dynamic")],
                         ids=["int8", "int4", "int3", "nf4", "w8a8"])
def test_quantized_directory_round_trip(tiny, tmp_path, cfg):
    ids = torch.randint(0, 256, (2, 12))
    reference = tiny(ids)
    report = quantize_model(tiny, cfg)
    logits = tiny(ids)
    assert (logits - reference).abs().max() < 0.5  # quantized, not broken
    assert type(tiny) is lmstack.Transformer  # principle 3: leaves swapped, not the model
    save_quantized(tiny, tmp_path / "q")
    hf = json.loads((tmp_path / "q" / "config.json").read_text())
    assert hf["quantization_config"]["method"] == cfg.method
    assert len(hf["quantization_config"]["modules"]) == 14
    loaded = lmstack.load_model(tmp_path / "q")
    assert torch.equal(loaded(ids), logits)
    assert report.bytes_per_parameter < 4


def test_bad_input_messages(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"model.layers.0.self_attn.q_proj: input size 64 is not a multiple "
                                          r"of the group size 48; choose a --group-size that divides it"):
        quantize_model(tiny, QuantConfig("rtn", 4, 48))
    with pytest.raises(ConfigError, match="needs calibration text"):
        quantize_model(tiny, QuantConfig("gptq"))
    quantize_model(tiny, QuantConfig("rtn", 4, 32))
    save_quantized(tiny, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format version 99, but this lmstack reads up to 1; upgrade"):
        lmstack.load_model(tmp_path / "q")
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}  # another tool's: refused by read_config
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"quant_method 'gptq'\) is not supported yet"):
        lmstack.load_model(tmp_path / "q")


def test_quantized_head_generates(tiny):
    assert not tiny.config.tie_word_embeddings
    quantize_model(tiny, QuantConfig("rtn", 4, 32, include_head=True))
    assert isinstance(tiny.lm_head, IntLinear)
    out = lmstack.generate(tiny, None, [[1, 2, 3]], max_new_tokens=4, ignore_eos=True)
    assert len(out.token_ids[0]) == 4


def test_a_tied_head_is_quantized_as_its_own_copy_and_round_trips(tmp_path):
    """include_head on a tied model: the head becomes an int8 copy (what every decode step reads), the
    embedding stays fp32 and tied to nothing; the directory loads back to the same logits; the report counts
    the copy's bytes but not its parameters twice."""
    torch.manual_seed(0)
    model = lmstack.Transformer(lmstack.ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                                                    num_kv_heads=2, intermediate_size=128, max_seq_len=64,
                                                    tie_word_embeddings=True)).eval()
    embedding = model.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, 256, (2, 12))
    report = quantize_model(model, QuantConfig("rtn", 8, None, symmetric=True, include_head=True))
    assert isinstance(model.lm_head, IntLinear) and torch.equal(model.model.embed_tokens.weight, embedding)
    assert report.total_parameters == sum(p.numel() for p in lmstack.Transformer(model.config).parameters())
    head = model.lm_head.int_weight().dequantize()
    assert (head - embedding).abs().max() <= embedding.abs().amax(1).max() / 127  # within one int8 step
    with torch.no_grad():
        logits = model(ids)
        hidden = model.hidden_states(ids)
        # the packed kernel takes and returns bf16 activations where the CPU has native bf16 (lmstack.quant.linear)
        expected = (hidden.to(KERNEL_DTYPE).float() @ head.T).to(KERNEL_DTYPE).float()
        torch.testing.assert_close(logits, expected, atol=1e-3, rtol=1e-2)
    save_quantized(model, tmp_path / "q")
    loaded = lmstack.load_model(tmp_path / "q").eval()
    assert isinstance(loaded.lm_head, IntLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), logits)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [QuantConfig("rtn", 8, None, True), QuantConfig("rtn", 4, 32)], ids=["int8", "int4"])
def test_compiled_decode_runs_the_packed_kernels(tiny, cfg):
    """The frozen compiled decode step (lmstack.generate.compiled) calls the packed kernels: same tokens as eager."""
    quantize_model(tiny, cfg)
    assert tiny.model.layers[0].mlp.up_proj.kernel == ("int8" if cfg.bits == 8 else "int4")
    prompt = [[5, 6, 7, 8]]
    eager = lmstack.generate(tiny, None, prompt, max_new_tokens=8, ignore_eos=True)
    compiled = lmstack.generate(tiny, None, prompt, max_new_tokens=8, ignore_eos=True, compile=True)
    assert compiled.token_ids == eager.token_ids
