"""What a recipe passes to the engine: which parameters train, the optimizer's groups, what a checkpoint holds,
and a batch source that samples from the model being trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmstack import Transformer, preset
from lmstack.data.loader import PretrainBatches, TokenStream
from lmstack.errors import CheckpointError
from lmstack.train.checkpoint import TRAINABLE_TENSORS, TrainableOnly
from lmstack.train.config import OptimConfig, ScheduleConfig, TrainConfig
from lmstack.train.engine import Engine
from lmstack.train.objectives import causal_lm_loss
from lmstack.train.optim import parameter_groups


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("llama-tiny", vocab_size=64, max_seq_len=32))


def _objective(model, batch):
    return causal_lm_loss(model, *batch)


def _cfg(**train) -> TrainConfig:
    return TrainConfig(**{"steps": 4, "batch_size": 4, "seq_len": 16, "progress": False, "eval_every": 0,
                          "peak_flops": 1e9, **train})


def _mlp_only(name: str, param: torch.nn.Parameter) -> bool:
    return ".mlp." in name


def test_trainable_chooses_what_trains(tiny_data: Path):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = PretrainBatches(TokenStream(tiny_data / "train"), 16, 4)
    engine = Engine(model, _objective, batches, _cfg(), OptimConfig(lr=1e-2), ScheduleConfig(), trainable=_mlp_only)
    engine.fit()
    optimised = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        assert (id(param) in optimised) == _mlp_only(name, param), name
        assert torch.equal(before[name], param) != _mlp_only(name, param), name


def test_param_groups_with_their_own_learning_rate_scale(tiny_data: Path):
    def groups(model, cfg):
        decay, no_decay = parameter_groups(model, cfg)
        return [{**decay, "lr_scale": 4.0}, no_decay]

    engine = Engine(_model(), _objective, PretrainBatches(TokenStream(tiny_data / "train"), 16, 4), _cfg(),
                    OptimConfig(lr=1e-3), ScheduleConfig(kind="constant"), param_groups=groups)
    engine.train_step(0)
    assert [g["lr"] for g in engine.optimizer.param_groups] == pytest.approx([4e-3, 1e-3])


def test_a_checkpoint_of_only_the_trainable_part_resumes_exactly(tiny_data: Path, tmp_path: Path):
    def engine(out: Path, resume_from: Path | None = None) -> Engine:
        return Engine(_model(), _objective, PretrainBatches(TokenStream(tiny_data / "train"), 16, 4),
                      _cfg(checkpoint_every=2), OptimConfig(lr=1e-2), ScheduleConfig(), out_dir=out,
                      trainable=_mlp_only, store=TrainableOnly(), resume_from=resume_from)

    straight = engine(tmp_path / "straight")
    straight.fit()
    step2 = tmp_path / "straight/checkpoints/step-00000002"
    stored = load_file(step2 / TRAINABLE_TENSORS)
    assert set(stored) == {n for n, p in straight.base_model.named_parameters() if _mlp_only(n, p)}
    assert not (step2 / "model.safetensors").exists()

    resumed = engine(tmp_path / "resumed", resume_from=step2)
    assert resumed.start_step == 2
    resumed.fit()
    for (name, a), b in zip(resumed.base_model.named_parameters(), straight.base_model.parameters()):
        assert torch.equal(a, b), name

    with pytest.raises(CheckpointError, match="no tensor for trainable parameter"):
        Engine(_model(), _objective, PretrainBatches(TokenStream(tiny_data / "train"), 16, 4), _cfg(), OptimConfig(),
               ScheduleConfig(), trainable=lambda n, p: True, store=TrainableOnly(), resume_from=step2)


class OnPolicyBatches:
    """Greedy continuations of the model being trained become its next training batch (the shape of a
    PPO / GRPO rollout source): a pure function of (step, the model's weights)."""

    needs_model = True
    tokens_per_step = 4 * 16

    def __init__(self):
        self.seen_training_mode: list[bool] = []
        self.seen_weights: list[torch.Tensor] = []

    def micro_batches(self, step: int, model: torch.nn.Module):
        self.seen_training_mode.append(model.training)
        self.seen_weights.append(model.model.layers[0].mlp.up_proj.weight.detach().clone())
        prompt = torch.full((4, 1), step % 60)
        with torch.no_grad():
            ids = prompt
            for _ in range(16):
                ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return [(ids[:, :-1], ids[:, 1:])]


def test_a_batch_source_may_depend_on_the_current_model():
    source = OnPolicyBatches()
    engine = Engine(_model(), _objective, source, _cfg(steps=3), OptimConfig(lr=1e-2), ScheduleConfig())
    engine.fit()
    assert source.seen_training_mode == [False, False, False]  # rollouts sample in eval mode
    assert engine.base_model.training  # and training goes on in train mode
    weights = source.seen_weights  # each step sampled from the weights the previous steps left
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    assert torch.equal(weights[0], _model().model.layers[0].mlp.up_proj.weight)
