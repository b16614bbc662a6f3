"""8-bit AdamW: bitsandbytes' dynamic maps and block-wise update, its memory, and its checkpoint round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lmstack.quant.nf4 import dynamic_map as nf4_dynamic_map
from lmstack.train.checkpoint import flatten_optimizer_state, unflatten_optimizer_state
from lmstack.train.optim8bit import (
    AdamW8bit,
    CodeSearch,
    dequantize_blockwise,
    dynamic_map,
    quantize_blockwise,
    state_bytes,
)


def test_maps_and_blockwise_round_trip():
    assert torch.equal(dynamic_map(True), nf4_dynamic_map())  # the one QLoRA's double quantization uses
    assert dynamic_map(False).min() == 0 and dynamic_map(False).max() == 1 and dynamic_map(False).numel() == 256
    x = torch.randn(1000) * torch.logspace(-4, 0, 1000)
    codes, absmax = quantize_blockwise(x, dynamic_map(True))
    assert codes.dtype == torch.uint8 and absmax.shape == (4,)
    back = dequantize_blockwise(codes, absmax, dynamic_map(True))
    assert ((back - x).abs() / absmax.repeat_interleave(256)[:1000]).max() < 0.05  # within a code step of the block


@pytest.mark.parametrize("signed", [True, False])
def test_table_search_equals_a_binary_search_for_every_kind_of_float(signed):
    code = dynamic_map(signed)
    midpoints = (code[:-1] + code[1:]) / 2
    torch.manual_seed(0)
    x = torch.cat([torch.rand(100_000) * 2 - 1, (torch.rand(100_000) * 2 - 1) * torch.logspace(-12, 0, 100_000),
                   code, midpoints, midpoints.nextafter(torch.tensor(2.0)), midpoints.nextafter(torch.tensor(-2.0)),
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40])])  # the boundaries, ties and subnormals
    x = x if signed else x.abs()
    assert torch.equal(CodeSearch(code)(x), torch.bucketize(x, midpoints, out_int32=True))


def test_matches_bitsandbytes_and_tracks_fp32_adamw_with_a_quarter_of_the_state():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    w = torch.randn(64, 301)  # 19,264 values: 75 blocks and a partial one, in 10 chunks of 2,048
    ours, theirs, fp32 = (torch.nn.Parameter(w.clone()) for _ in range(3))
    kwargs = {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.9, 0.999)}
    optimizers = [AdamW8bit([ours], **kwargs, chunk_size=2048), bnb.optim.AdamW8bit([theirs], **kwargs, min_8bit_size=4096),
                  torch.optim.AdamW([fp32], **kwargs)]
    assert torch.equal(dynamic_map(False), bnb.functional.create_dynamic_map(signed=False))
    for _ in range(20):
        g = torch.randn_like(w)
        for p, opt in zip((ours, theirs, fp32), optimizers):
            p.grad = g.clone()
            opt.step()
    mine, bnb_state = optimizers[0].state[ours], optimizers[1].state[theirs]
    # bitsandbytes' quantizer searches its map approximately: a few codes land one step apart
    assert (mine["exp_avg"] == bnb_state["state1"].view(-1)).float().mean() > 0.97
    assert (mine["exp_avg_sq"] == bnb_state["state2"].view(-1)).float().mean() > 0.97
    assert (ours - theirs).abs().max() < 0.01 and (ours - fp32).abs().max() < 0.01
    assert state_bytes(optimizers[0]) / state_bytes(optimizers[2]) < 0.26


def test_chunks_change_nothing_and_temporaries_do_not_grow_with_the_tensor():
    """Blocks are independent, so updating 256 values at a time or the whole tensor at once gives the same bits;
    and the update holds chunk-sized fp32 temporaries, not tensor-sized ones."""
    torch.manual_seed(0)
    w = torch.randn(70_001)
    small, whole = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opts = [AdamW8bit([small], lr=1e-2, weight_decay=0.1, chunk_size=256),
            AdamW8bit([whole], lr=1e-2, weight_decay=0.1, chunk_size=71_936)]
    for _ in range(5):
        g = torch.randn_like(w)
        for p, opt in zip((small, whole), opts):
            p.grad = g.clone()
            opt.step()
    assert torch.equal(small, whole)
    assert all(torch.equal(opts[0].state[small][k], opts[1].state[whole][k]) for k in opts[0].state[small])

    peaks = {}
    for chunk in (4096, 300_032):
        p = torch.nn.Parameter(torch.randn(300_000))
        p.grad = torch.randn(300_000)
        opt = AdamW8bit([p], lr=1e-3, chunk_size=chunk)
        opt.step()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            opt.step()
        peaks[chunk] = max(e.cpu_memory_usage for e in prof.events())  # the largest one op allocated
    assert peaks[4096] <= 4096 * 8 < 300_000 * 4 <= peaks[300_032]


def test_one_thread_update_gives_the_same_bits_and_restores_torchs_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w, g = torch.randn(70_000), torch.randn(70_000)
        params = [torch.nn.Parameter(w.clone()) for _ in range(2)]
        for p, threads in zip(params, (1, None)):  # one thread for the update, or torch's two
            p.grad = g.clone()
            AdamW8bit([p], lr=1e-2, threads=threads).step()
            assert torch.get_num_threads() == 2
        assert torch.equal(params[0], params[1])
    finally:
        torch.set_num_threads(before)


def test_state_survives_the_checkpoint_format():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LayerNorm(128))
    opt = AdamW8bit(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(torch.randn(4, 64)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    tensors, skeleton = flatten_optimizer_state(opt.state_dict())
    tensors = {k: v.clone() for k, v in tensors.items()}  # as read back from disk: not the live state
    twin = copy.deepcopy(model)
    restored = AdamW8bit(twin.parameters(), lr=1e-3)
    restored.load_state_dict(unflatten_optimizer_state(tensors, skeleton))
    x = torch.randn(4, 64)
    for m, o in ((model, opt), (twin, restored)):
        m(x).square().sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
