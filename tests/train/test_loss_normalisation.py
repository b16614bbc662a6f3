"""The engine's loss contract: objectives return (summed loss, items scored); a step's gradient is the mean over
every scored item of the step, however the batch is split into micro-batches or ranks, also when each
micro-batch scores a different number of tokens. Checked against the gradient of one plain
cross-entropy over the whole batch, to 1e-6."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmstack import Transformer, preset
from lmstack.train.config import OptimConfig, ScheduleConfig, TrainConfig
from lmstack.train.distributed import DistContext
from lmstack.train.engine import Engine
from lmstack.train.objectives import causal_lm_loss

ROWS, T, VOCAB = 8, 12, 64


def uneven_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """8 rows whose numbers of scored targets differ a lot (12 down to 1, and row 5 none at all): each row's
    first targets are masked, as SFT masks a prompt."""
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, VOCAB, (ROWS, T), generator=g)
    targets = torch.randint(0, VOCAB, (ROWS, T), generator=g)
    scored = [1, 12, 3, 7, 2, 0, 11, 5]
    for row, n in enumerate(scored):
        targets[row, :T - n] = -100
    return inputs, targets


class RowsBatches:
    """The 8 rows, this rank's share, cut into micro-batches of `rows_per_micro` rows."""

    def __init__(self, rows_per_micro: int, rank: int = 0, world_size: int = 1):
        self.rows_per_micro, self.rank, self.world_size = rows_per_micro, rank, world_size
        self.tokens_per_step = ROWS * T

    def micro_batches(self, step: int):
        inputs, targets = uneven_batch()
        share = ROWS // self.world_size
        mine = slice(self.rank * share, (self.rank + 1) * share)
        inputs, targets = inputs[mine], targets[mine]
        return [(inputs[i:i + self.rows_per_micro], targets[i:i + self.rows_per_micro])
                for i in range(0, share, self.rows_per_micro)]


def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("llama-tiny", vocab_size=VOCAB, max_seq_len=T))


def engine_gradients(rows_per_micro: int, dist: DistContext | None = None) -> dict[str, torch.Tensor]:
    dist = dist or DistContext()
    engine = Engine(model(), lambda m, b: causal_lm_loss(m, *b), RowsBatches(rows_per_micro, dist.rank, dist.world_size),
                    TrainConfig(steps=1, batch_size=rows_per_micro, seq_len=T, progress=False, peak_flops=1e9),
                    OptimConfig(), ScheduleConfig(), dist=dist)
    engine.compute_gradients(0)
    return {n: p.grad.detach().clone() for n, p in engine.base_model.named_parameters()}


def reference_gradients() -> dict[str, torch.Tensor]:
    reference = model()
    inputs, targets = uneven_batch()
    logits = reference(inputs)
    F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100).backward()  # mean over kept
    return {n: p.grad for n, p in reference.named_parameters()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("rows_per_micro", [8, 1, 2])
def test_any_split_into_micro_batches_gives_the_mean_over_all_scored_tokens(rows_per_micro: int):
    assert_same(engine_gradients(rows_per_micro), reference_gradients())


def test_a_per_micro_batch_mean_would_differ():
    """The check has teeth: averaging per-micro-batch means (the old contract) is far off on these masks."""
    net = model()
    for inputs, targets in RowsBatches(1).micro_batches(0):
        loss = causal_lm_loss(net, inputs, targets)
        (loss.mean() / ROWS).backward()
    want = reference_gradients()
    worst = max((p.grad - want[n]).abs().max().item() for n, p in net.named_parameters())
    assert worst > 1e-3


WORKER = """
import sys, torch
from safetensors.torch import save_file
from lmstack.train.distributed import init_distributed, shutdown_distributed
sys.path.insert(0, {tests!r})
from train.test_loss_normalisation import engine_gradients
torch.set_num_threads(1)
dist = init_distributed("cpu")
grads = engine_gradients(2, dist)   # each rank: 4 rows as 2 micro-batches of 2
if dist.rank == 0:
    save_file({{k: v.contiguous() for k, v in grads.items()}}, {out!r})
shutdown_distributed()
"""


def test_two_ranks_with_uneven_masks_give_the_same_gradient(tmp_path: Path):
    out = tmp_path / "grads.safetensors"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).resolve().parents[1]), out=str(out)))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same(load_file(out), reference_gradients())
