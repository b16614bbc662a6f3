"""Forgetting mitigations: EWC and L2-SP penalties against hand-computed values (full weights, LoRA's merged
update, IA3), the empirical Fisher against per-window autograd, the Fisher file's fingerprint check, the
penalty's once-per-step weighting, replay batches (a pure function of the step), and a finetune run with all three."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lmstack
from lmstack.adapters import IA3Config, LoraConfig, apply_ia3, apply_lora, unload
from lmstack.data.loader import TokenStream
from lmstack.data.replay import ReplayBatches
from lmstack.errors import CheckpointError, ConfigError
from lmstack.train.objectives.loss import Loss
from lmstack.train.objectives.regularizers import (
    estimate_fisher,
    ewc_penalty,
    fingerprint,
    l2sp_penalty,
    load_fisher,
    regularized,
    save_fisher,
)
from tests.finetune.test_recipe import config, write_data
from tests.train.conftest import write_split


def tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return lmstack.Transformer(lmstack.preset("llama-tiny", vocab_size=50, num_layers=1, hidden_size=32,
                                              intermediate_size=48, bos_token_id=None, eos_token_id=None,
                                              pad_token_id=None))


def random_fisher(model, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}


def test_ewc_and_l2sp_on_full_weights_match_the_formulas():
    model = tiny()
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    fisher = random_fisher(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    expected_ewc = sum((fisher[n] * (p.detach() - anchors[n]) ** 2).sum() for n, p in model.named_parameters())
    expected_l2 = sum(((p.detach() - anchors[n]) ** 2).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(ewc_penalty(model, fisher, anchors, 3.0), 1.5 * expected_ewc)
    torch.testing.assert_close(l2sp_penalty(model, anchors, 0.5), 0.25 * expected_l2)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_adapter_penalties_measure_the_change_of_the_merged_weights(method):
    base = tiny()
    model = tiny()
    if method == "ia3":
        apply_ia3(model, IA3Config())
    else:
        apply_lora(model, LoraConfig(r=2, lora_alpha=4, use_dora=method == "dora"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    fisher = random_fisher(base)
    merged = dict(unload(copy.deepcopy(model)).named_parameters())
    expected = sum((fisher[n] * (merged[n] - p) ** 2).sum() for n, p in base.named_parameters())
    got = ewc_penalty(model, fisher, {}, 2.0)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-4, atol=1e-6)
    got.backward()  # differentiable in the adapter's parameters only
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fisher_is_the_mean_squared_gradient_per_window_and_knows_its_model(tmp_path):
    model = tiny()
    windows = [(torch.randint(0, 50, (7,)), torch.randint(0, 50, (7,))) for _ in range(3)]
    fisher = estimate_fisher(model, windows)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in windows:
        model.zero_grad()
        F.cross_entropy(model(x[None])[0], y).backward()  # the mean over the window's tokens, via the logits
        for n, p in model.named_parameters():
            expected[n] += p.grad**2 / len(windows)
    for n, value in expected.items():
        torch.testing.assert_close(fisher[n], value, rtol=1e-4, atol=1e-10)
    save_fisher(tmp_path / "f.safetensors", fisher, fingerprint(model), 3)
    assert load_fisher(tmp_path / "f.safetensors", fingerprint(model)).keys() == fisher.keys()
    with pytest.raises(CheckpointError, match="estimated on another model"):
        load_fisher(tmp_path / "f.safetensors", fingerprint(tiny(seed=1)))


def test_a_penalty_counts_once_per_step_whatever_the_micro_batches():
    model = tiny()

    def objective(m, batch):
        return Loss(torch.tensor(float(batch)), batch)

    with_penalty = regularized(objective, lambda m: torch.tensor(0.5))
    parts = [with_penalty(model, 3), with_penalty(model, 5)]
    total, count = sum(p.total for p in parts), sum(p.count for p in parts)
    torch.testing.assert_close(total / count, torch.tensor(1.0 + 0.5))  # the mean loss (8/8) plus the penalty


def shards(directory, n=3000, seed=0):
    tokens = np.random.default_rng(seed).integers(0, 40, n)
    write_split(directory / "train", tokens, 64, 39, shard_tokens=1000)
    write_split(directory / "val", tokens[:300], 64, 39, shard_tokens=1000)
    return directory


def test_replay_mixes_the_fraction_and_is_a_pure_function_of_the_step(tmp_path):
    class Source:
        batch_size, seq_len, grad_accum, world_size, tokens_per_step = 6, 16, 2, 1, 100

        def micro_batches(self, step):
            x = torch.full((6, 16), step)
            return [{"input_ids": x, "targets": x, "attention_mask": torch.ones_like(x),
                     "position_ids": torch.arange(16).expand(6, 16)} for _ in range(2)]

    stream = TokenStream(shards(tmp_path / "data") / "train")
    replay = ReplayBatches(Source(), stream, 0.25, seed=3)
    first, again, other = replay.micro_batches(4), replay.micro_batches(4), replay.micro_batches(5)
    assert replay.rows == 2 and first[0]["input_ids"].shape == (8, 16)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again) for k in a)
    assert not torch.equal(first[0]["input_ids"][6:], other[0]["input_ids"][6:])
    assert not torch.equal(first[0]["input_ids"][6:], first[1]["input_ids"][6:])  # each micro-batch its own windows
    rows = first[0]
    torch.testing.assert_close(rows["targets"][6:, :-1], rows["input_ids"][6:, 1:])  # every replay token in the loss
    assert replay.tokens_per_step == 100 + 2 * 16 * 2


def test_finetune_with_replay_ewc_and_l2sp(base_dir, tmp_path):
    from lmstack.train.recipes.finetune import build_engine

    data = shards(tmp_path / "pretrain")
    fisher = tmp_path / "fisher.safetensors"
    forgetting = {"forgetting.replay_data": data, "forgetting.replay_fraction": 0.5, "forgetting.ewc_lambda": 10.0,
                  "forgetting.ewc_fisher": fisher, "forgetting.ewc_windows": 4, "forgetting.l2sp_alpha": 1.0,
                  "train.steps": 2, "train.seq_len": 64}
    result = build_engine(config(base_dir, write_data(tmp_path / "d.jsonl"), tmp_path / "run", **forgetting)).fit()
    assert fisher.is_file() and result.checkpoint is not None
    records = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"ewc"' in records and '"l2sp"' in records
    # the Fisher file is reused, and refused for another base
    other = tmp_path / "other"
    lmstack.save_model(lmstack.Transformer(lmstack.load_model(base_dir).config), other,
                       extra_files={p.name: p for p in base_dir.iterdir() if p.name.startswith("tokenizer")})
    with pytest.raises(CheckpointError, match="estimated on another model"):
        build_engine(config(other, write_data(tmp_path / "d.jsonl"), tmp_path / "run2", **forgetting))
    with pytest.raises(ConfigError, match="changes no base weight"):
        build_engine(config(base_dir, write_data(tmp_path / "d.jsonl"), tmp_path / "run3", method="prompt",
                            **forgetting))
