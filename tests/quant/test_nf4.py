"""NF4 / FP4 against their published definitions and against bitsandbytes' CPU path (bytes and values)."""

from __future__ import annotations

import pytest
import torch

from lmstack.quant.nf4 import FP4_CODE, NF4_CODE, NF4Weight, dynamic_map, quantize_fp4, quantize_nf4

# QLoRA (Dettmers et al. 2023), Appendix E: the NF4 data type's 16 values.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]

SHAPES = [(96, 128), (33, 65), (7,), (3, 5, 64)]  # whole blocks, a short last block, odd counts, 3-D


def test_codebooks_are_the_published_values():
    assert NF4_CODE.tolist() == pytest.approx(PUBLISHED_NF4, abs=0, rel=1e-7)
    # FP4 as bitsandbytes lays it out: index = bit pattern (sign, then 3 bits), values over 12 so that max = 1
    raw = [0, 0.0625, 8, 12, 4, 6, 2, 3]
    assert FP4_CODE.tolist() == pytest.approx([v / 12 for v in raw] + [-v / 12 for v in raw], abs=0, rel=1e-7)
    assert [torch.signbit(FP4_CODE[i]).item() for i in (0, 8)] == [False, True]


def test_hand_computed_block():
    w = torch.tensor([1.0, -2.0, 0.5, 0.0] + [0.0] * 60)  # absmax 2: scaled 0.5, -1, 0.25, 0
    q = quantize_nf4(w, block_size=64, double_quant=False)
    assert q.absmax.tolist() == [2.0]
    # 0.5 -> 0.4407 (index 12; 0.5626 is 0.003 farther), -1 -> 0, 0.25 -> 0.2461 (index 10), 0 -> 7; high nibble first
    assert q.packed[:2].tolist() == [12 << 4 | 0, 10 << 4 | 7]
    assert q.dequantize()[:4].tolist() == pytest.approx([2 * 0.44070982933044434, -2.0, 2 * 0.24611230194568634, 0.0])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_round_trip_error_and_size(quant_type):
    w = torch.randn(256, 512) * 0.02
    q = quantize_nf4(w, quant_type=quant_type, double_quant=False)
    # Every value lands on its nearest code: the error is at most half the widest gap between codes.
    code = (NF4_CODE if quant_type == "nf4" else FP4_CODE).sort().values
    widest = (code[1:] - code[:-1]).max().item() / 2
    absmax = w.view(-1, 64).abs().amax(1, keepdim=True)
    assert ((q.dequantize().view(-1, 64) - w.view(-1, 64)).abs() <= widest * absmax + 1e-7).all()
    assert q.bytes_per_parameter() == 0.5 + 4 / 64
    dq = quantize_nf4(w, quant_type=quant_type)
    # QLoRA's 4.127 bits: 4 + 8/64 + 32/(64*256), plus the one fp32 offset
    assert dq.nbytes() * 8 == w.numel() * (4 + 8 / 64 + 32 / (64 * 256)) + 32
    assert (dq.dequantize() - q.dequantize()).abs().max() < 0.01 * w.abs().max()


def test_state_dict_round_trip_and_errors():
    w = torch.randn(64, 64, dtype=torch.bfloat16)
    q = quantize_fp4(w)
    back = NF4Weight.from_state_dict(q.state_dict(), q.shape, q.block_size, q.quant_type, q.dtype)
    assert torch.equal(back.dequantize(), q.dequantize()) and back.dequantize().dtype == torch.bfloat16
    with pytest.raises(ValueError, match="quant_type"):
        quantize_nf4(w, quant_type="int4")
    with pytest.raises(ValueError, match="block_size"):
        quantize_nf4(w, block_size=63)
    with pytest.raises(ValueError, match="floating-point"):
        quantize_nf4(torch.ones(64, dtype=torch.int32))


# --------------------------------------------------------------------------------- bitsandbytes parity
@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes.functional")


def test_dynamic_map_equals_bitsandbytes(bnb):
    assert torch.equal(dynamic_map(), bnb.create_dynamic_map())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_bytes_and_values_equal_bitsandbytes(bnb, quant_type, shape):
    w = torch.randn(*shape) * 0.05
    w.view(-1)[::17] = 0.0  # exact zeros: FP4 has two (+0 and -0), the tie must go where bitsandbytes puts it
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=False)
    q = quantize_nf4(w, 64, double_quant=False, quant_type=quant_type)
    assert torch.equal(q.packed, packed.flatten())
    assert torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.dequantize(), bnb.dequantize_4bit(packed, state))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(300, 1024), (33, 65)])
def test_double_quant_equals_bitsandbytes(bnb, quant_type, shape):
    w = torch.randn(*shape) * 0.05
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    q = quantize_nf4(w, 64, double_quant=True, quant_type=quant_type)
    assert torch.equal(q.packed, packed.flatten())
    assert torch.equal(q.dq_absmax, state.state2.absmax) and torch.equal(q.dq_offset, state.offset)
    # The 8-bit scale indices: bitsandbytes' C kernel finds the code by a binary search that, rarely (about
    # 1 in 500), lands one code away from the nearest; lmstack takes the nearest. Equal everywhere else,
    # and never farther from the true scale.
    code = dynamic_map()
    scaled = (quantize_nf4(w, 64, double_quant=False).absmax - state.offset)
    scaled = scaled / state.state2.absmax.repeat_interleave(256)[: scaled.numel()]
    ours, theirs = (scaled - code[q.absmax.long()]).abs(), (scaled - code[state.absmax.long()]).abs()
    assert (ours <= theirs).all()
    assert (q.absmax != state.absmax).float().mean() < 0.01
    # Dequantizing bitsandbytes' own bytes gives its values exactly.
    theirs_here = NF4Weight.from_state_dict({"packed": packed.flatten(), "absmax": state.absmax,
                                             "dq_absmax": state.state2.absmax, "dq_offset": state.offset},
                                            shape, 64, quant_type)
    assert torch.equal(theirs_here.dequantize(), bnb.dequantize_4bit(packed, state))


@pytest.mark.slow
def test_codes_match_torchao_nf4tensor():
    """torchao's NF4Tensor (26 s to import here): same nibble layout and the same codes, except where its
    4-digit NF4 table (-0.6962 for -0.6961928...) moves a boundary under a value."""
    nf4_tensor = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    w = torch.randn(128, 256)
    theirs = nf4_tensor.to_nf4(w, 64, 256).quantized_data
    ours = quantize_nf4(w, 64, double_quant=False)
    assert theirs.shape == ours.packed.shape
    assert (theirs != ours.packed).float().mean() < 1e-3
