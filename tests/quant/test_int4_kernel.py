"""The int4 linear's kernels (lmstack.quant.linear.IntLinear, kernel "int4") against dequantize-then-matmul:
eager (torch's packed op) and inside a frozen compiled graph (inductor's weight-only-int4 GEMM template where
the CPU has it, else the opaque op, as on a CPU without AVX-512), at one row and several, for groups of 32 / 64 /
128 and output sizes that are not a multiple of 64 nor of 16 (torch's packing needs 16 rows, the template 64: padded
with zero-weight rows, sliced off the output); K = 96 is not a multiple of 64 either (groups of 64 / 128 force it).

The reference is the input rounded as the kernel takes it (bf16 where the CPU has native bf16) times the
dequantized weight in fp32. Tolerance: the kernels round products / outputs to bf16 (8 bits of mantissa), so
relative 2e-2 of the output's scale; fp32 activations (no native bf16) get 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lmstack.quant.linear
from lmstack.generate.compiled import FROZEN_CPU_INDUCTOR
from lmstack.quant.formats import quantize_rtn
from lmstack.quant.linear import INT4_TEMPLATE, INT4_TEMPLATE_GROUPS, KERNEL_DTYPE, IntLinear

# (N, K, group): N never a multiple of 64; K = 96 is not one either (groups of 64 / 128 force K to be)
CASES = [(100, 96, 32), (72, 192, 64), (136, 384, 128)]
TOL = 2e-2 if KERNEL_DTYPE == torch.bfloat16 else 1e-4
# The template where this CPU has it, and the opaque op everywhere (what an AVX2-only CPU runs).
TEMPLATE_CHOICES = [True, False] if INT4_TEMPLATE else [False]


@pytest.fixture(params=TEMPLATE_CHOICES, ids=lambda t: "template" if t else "opaque")
def template(request, monkeypatch):
    monkeypatch.setattr(lmstack.quant.linear, "INT4_TEMPLATE", request.param)  # read when a layer is built
    return request.param


def layer_and_reference(N: int, K: int, group: int) -> tuple[IntLinear, torch.Tensor]:
    w = torch.randn(N, K) * 0.05
    q = quantize_rtn(w, 4, group, symmetric=False)
    return IntLinear.from_weight(q), q.dequantize()


def expected(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.to(KERNEL_DTYPE).float() @ w.t()


def assert_close_to(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.shape == ref.shape and y.dtype == torch.float32
    scale = ref.abs().max().item()
    torch.testing.assert_close(y, ref, rtol=TOL, atol=TOL * scale)


@pytest.mark.parametrize("N,K,group", CASES, ids=[f"{n}x{k}g{g}" for n, k, g in CASES])
def test_int4_eager_equals_dequantized_matmul(N, K, group, template):
    layer, w = layer_and_reference(N, K, group)
    assert layer.kernel == "int4"
    assert layer.int4_lowered == (template and group in INT4_TEMPLATE_GROUPS)
    assert layer.w_int4.shape[0] == -(-N // (64 if layer.int4_lowered else 16)) * (64 if layer.int4_lowered else 16)
    for x in (torch.randn(1, 1, K), torch.randn(2, 5, K)):  # M = 1 (a decode step) and M = 10
        assert_close_to(layer(x), expected(x, w))


@pytest.mark.slow  # one inductor compilation with autotuning: ~30-60 s on 2 shared cores
def test_int4_compiled_equals_dequantized_matmul(template):
    """All cases in one frozen graph (one compilation), at M = 1 and M = 6 in the same call; with the template,
    inductor lowered every int4 matmul itself: the opaque op is not called from the generated code."""
    layers, weights = zip(*(layer_and_reference(*case) for case in CASES))
    holder = nn.ModuleList(layers).eval()
    xs = [(torch.randn(1, K), torch.randn(6, K)) for _, K, _ in CASES]

    def forward(mods: nn.ModuleList, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        return [m(x) for m, pair in zip(mods, inputs) for x in pair]

    step = torch.compile(forward, fullgraph=True, dynamic=False)
    from torch._inductor.utils import run_and_get_code

    with torch.no_grad(), torch._inductor.config.patch(FROZEN_CPU_INDUCTOR):
        outputs, code = run_and_get_code(step, holder, xs)
    references = [expected(x, w) for w, pair in zip(weights, xs) for x in pair]
    for y, ref in zip(outputs, references):
        assert_close_to(y, ref)
    source = "\n".join(code)
    assert ("int4_weight_mm" in source) == (not template)


def test_padded_kernel_form_is_not_saved_and_is_rebuilt_on_load(template):
    """The state dict is the documented format (qweight, scales, zeros) whatever the kernel form; a layer loaded from
    it rebuilds the (padded) kernel form and computes the same output."""
    layer, _ = layer_and_reference(100, 96, 32)
    state = layer.state_dict()
    assert set(state) == {"qweight", "scales", "zeros"} and state["qweight"].shape == (100, 48)
    loaded = IntLinear(96, 100, 4, 32)
    loaded.load_state_dict(state)
    assert loaded.int4_lowered == layer.int4_lowered and torch.equal(loaded.w_int4, layer.w_int4)
    x = torch.randn(3, 96)
    assert torch.equal(loaded(x), layer(x))


@pytest.mark.parametrize("bits,group", [(4, 32), (8, None)], ids=["int4", "int8"])
def test_an_input_that_requires_grad_gets_its_gradient(bits, group):
    """The packed kernels have no backward; an input that requires grad (an adapter trained over a quantized base)
    goes through dequantize-then-matmul, so its gradient is the dequantized weight's."""
    q = quantize_rtn(torch.randn(100, 96) * 0.05, bits, group, symmetric=group is None)
    layer = IntLinear.from_weight(q)
    assert layer.kernel == ("int4" if bits == 4 else "int8")
    x = torch.randn(2, 96, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, q.dequantize().sum(0).expand(2, 96))
