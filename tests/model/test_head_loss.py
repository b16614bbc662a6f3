"""The head fused with cross-entropy against F.linear + F.cross_entropy, and the allocator setting
that keeps a training step's big CPU buffers mapped."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lmstack.model.head_loss as head_loss
from lmstack.config import ModelConfig
from lmstack.model import Transformer
from lmstack.train.objectives import causal_lm_loss, cross_entropy


def _reference(hidden, weight, targets, ignore_index=-100):
    return F.cross_entropy(F.linear(hidden, weight).flatten(0, -2), targets.flatten(), ignore_index=ignore_index,
                           reduction="sum")


@pytest.mark.parametrize("chunk_rows", [1, 7, 64])  # 64 rows: one chunk holds all 3 x 11 tokens
def test_loss_and_gradients_match_the_unfused_head(chunk_rows, monkeypatch):
    V, d = 53, 24
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 4 * V * chunk_rows)
    monkeypatch.setattr(head_loss, "MIN_CHUNK_ROWS", 1)
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, d, requires_grad=True)
    weight = torch.randn(V, d, requires_grad=True)
    targets = torch.randint(0, V, (3, 11))
    targets[0, :4] = -100  # prompt tokens, padding
    targets[2, -1] = -100

    loss = head_loss.linear_cross_entropy(hidden, weight, targets)
    (loss * 0.37).backward()  # a non-unit incoming gradient (mean reduction, loss scaling)
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = _reference(hidden, weight, targets)
    (expected * 0.37).backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)


def test_frozen_weight_no_grad_and_all_ignored():
    torch.manual_seed(1)
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(13, 8)  # frozen (an adapter's base head)
    targets = torch.randint(0, 13, (5,))
    loss = head_loss.linear_cross_entropy(hidden, weight, targets)
    assert [t.numel() for t in loss.grad_fn.saved_tensors] == [5 * 8, 0]  # no weight gradient computed or kept
    loss.backward()
    reference_hidden = hidden.detach().clone().requires_grad_()
    _reference(reference_hidden, weight, targets).backward()
    torch.testing.assert_close(hidden.grad, reference_hidden.grad)
    with torch.no_grad():
        torch.testing.assert_close(head_loss.linear_cross_entropy(hidden, weight, targets),
                                   _reference(hidden, weight, targets))
    assert head_loss.linear_cross_entropy(hidden, weight, torch.full((5,), -100)).item() == 0.0
    trained = weight.clone().requires_grad_()
    head_loss.linear_cross_entropy(hidden.detach(), trained, targets).backward()  # only the head trains
    reference_weight = weight.clone().requires_grad_()
    _reference(hidden.detach(), reference_weight, targets).backward()
    torch.testing.assert_close(trained.grad, reference_weight.grad)


def test_target_out_of_range_is_named():
    with pytest.raises(IndexError, match=r"must lie in \[0, 13\).*got 2\.\.13"):
        head_loss.linear_cross_entropy(torch.randn(3, 8), torch.randn(13, 8), torch.tensor([2, 13, 5]))


def test_transformer_loss_path_matches_its_logits(monkeypatch):
    """causal_lm_loss on a Transformer (fused) equals cross_entropy on its logits, summed and per token."""
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 4 * 97 * 16)  # several chunks
    monkeypatch.setattr(head_loss, "MIN_CHUNK_ROWS", 1)
    config = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=64, max_seq_len=32, tie_word_embeddings=True)
    torch.manual_seed(2)
    model = Transformer(config)
    ids = torch.randint(0, 97, (3, 20))
    targets = torch.randint(0, 97, (3, 20))
    targets[1, :5] = -100
    for reduction in ("mean", "sum"):
        loss = causal_lm_loss(model, ids, targets)
        assert int(loss.count) == (targets != -100).sum()
        fused = loss.total if reduction == "sum" else loss.mean()
        fused.backward()
        fused_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        plain = cross_entropy(model(ids), targets, reduction=reduction)
        plain.backward()
        torch.testing.assert_close(fused, plain)
        for got, p in zip(fused_grads, model.parameters()):
            torch.testing.assert_close(got, p.grad)
        model.zero_grad(set_to_none=True)


_MALLOC_SCRIPT = """
import ctypes, sys, torch
from lmstack.train.device import keep_freed_cpu_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo2") or (sys.argv[1] == "keep" and not keep_freed_cpu_memory()):
    print(-1, -1); sys.exit()
libc.mallinfo2.restype = MallInfo2
mmapped_before = libc.mallinfo2().hblkhd
buffer = torch.ones(16 * 2**20)  # 64 MiB: over glibc's largest default mmap threshold (32 MiB)
mmapped = libc.mallinfo2().hblkhd - mmapped_before
heap_in_use = libc.mallinfo2().arena
del buffer
print(mmapped, heap_in_use - libc.mallinfo2().arena)
"""


def test_keep_freed_cpu_memory_serves_big_buffers_from_a_kept_heap():
    """glibc's own counters, in a fresh process each: by default a 64 MiB tensor is a dedicated mmap (so
    each step's page faults it in again); with the setting it comes from the heap, which keeps it once freed."""
    def malloc_effect(mode: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", _MALLOC_SCRIPT, mode], capture_output=True, text=True, check=True)
        mmapped, heap_returned = map(int, out.stdout.split()[-2:])
        return mmapped, heap_returned

    kept = malloc_effect("keep")
    if kept == (-1, -1):
        pytest.skip("no glibc mallopt / mallinfo2 here")
    assert malloc_effect("default")[0] >= 64 * 2**20
    assert kept == (0, 0)  # nothing mmapped; nothing handed back to the OS on free
