"""The engine against a hand-written reference loop, and its policies (accumulation, clipping,
non-finite steps, precision, activation checkpointing), in-process on a tiny model."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from lmstack import Transformer, preset
from lmstack import device as device_mod
from lmstack.data.loader import PretrainBatches, TokenStream, validation_batches
from lmstack.errors import TrainingError
from lmstack.train.config import OptimConfig, ScheduleConfig, TrainConfig
from lmstack.train.engine import Engine, step_seed
from lmstack.train.metrics import read_metrics
from lmstack.train.objectives import causal_lm_loss
from lmstack.train.schedule import lr_at


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("llama-tiny", vocab_size=64, max_seq_len=32))


def _objective(model, batch):
    return causal_lm_loss(model, *batch)


def _engine(data: Path, out: Path | None = None, model: Transformer | None = None, resume_from: Path | None = None,
            **train) -> Engine:
    cfg = TrainConfig(**{"steps": 6, "batch_size": 4, "seq_len": 16, "progress": False, "eval_every": 3,
                         "peak_flops": 1e9, **train})
    stream = TokenStream(data / "train")
    batches = PretrainBatches(stream, cfg.seq_len, cfg.batch_size, cfg.grad_accum, cfg.seed)
    val = validation_batches(TokenStream(data / "val"), cfg.seq_len, cfg.batch_size, 8)
    return Engine(model or _model(), _objective, batches, cfg, OptimConfig(lr=3e-3, weight_decay=0.1),
                  ScheduleConfig(warmup_steps=2, min_lr=3e-4), out_dir=out, val_batches=val, resume_from=resume_from)


def test_engine_equals_a_hand_written_training_loop(tiny_data: Path):
    """Same data, same AdamW groups, same clipping and schedule, written out plainly -> the same weights
    (to float rounding: the loss is reduced in a different order, and Adam amplifies tiny gradients)."""
    engine = _engine(tiny_data, grad_clip=0.5)
    reference = copy.deepcopy(engine.base_model)
    engine.fit()

    decay = [p for n, p in reference.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in reference.named_parameters() if p.ndim < 2 or "embed" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    for step in range(6):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, 3e-3, ScheduleConfig(warmup_steps=2, min_lr=3e-4), 6)
        torch.manual_seed(step_seed(0, step, 0))
        (inputs, targets), = engine.batches.micro_batches(step)
        logits = reference(inputs)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    for (name, a), b in zip(engine.base_model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_grad_accumulation_equals_a_bigger_batch(tiny_data: Path, tmp_path: Path):
    big, small = _engine(tiny_data, tmp_path / "big", batch_size=8), _engine(tiny_data, tmp_path / "acc", grad_accum=2)
    big.fit(), small.fit()
    for a, b in zip(read_metrics(tmp_path / "big/metrics.jsonl"), read_metrics(tmp_path / "acc/metrics.jsonl")):
        assert a["kind"] == b["kind"] and a["step"] == b["step"]
        key = "loss" if a["kind"] == "train" else "val_loss"
        assert a[key] == pytest.approx(b[key], abs=1e-5)


def test_logs_checkpoints_and_plot(tiny_data: Path, tmp_path: Path):
    result = _engine(tiny_data, tmp_path, checkpoint_every=2, keep_last=1).fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in train)
    assert train[-1]["tokens"] == 6 * 4 * 16
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    assert result.val_loss == evals[-1]["val_loss"] and result.final_loss == train[-1]["loss"]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # keep_last=1 plus the best by validation loss
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-"))
    best = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    assert "step-00000006" in kept and best["checkpoint"] in kept and len(kept) <= 2
    assert best["val_loss"] == min(r["val_loss"] for r in evals)


def test_resume_into_a_different_model_is_a_clear_error(tiny_data: Path, tmp_path: Path):
    _engine(tiny_data, tmp_path, steps=2, eval_every=0).fit()
    other = Transformer(preset("llama-tiny", vocab_size=64, max_seq_len=32, intermediate_size=64))
    with pytest.raises(ValueError, match=r"step-00000002: does not fit the configured model .*size mismatch"):
        _engine(tiny_data, tmp_path, model=other, resume_from=tmp_path / "checkpoints/step-00000002")


def test_non_finite_steps_are_skipped_then_stop(tiny_data: Path, tmp_path: Path):
    engine = _engine(tiny_data, tmp_path, max_nonfinite=2, eval_every=0)
    calls = {"n": 0}

    def sometimes_nan(model, batch):
        calls["n"] += 1
        loss = causal_lm_loss(model, *batch)
        return loss.scaled(float("nan")) if calls["n"] in (2, 4, 5) else loss

    engine.objective = sometimes_nan
    before = {n: p.detach().clone() for n, p in engine.base_model.named_parameters()}
    engine.train_step(0)
    after_one = {n: p.detach().clone() for n, p in engine.base_model.named_parameters()}
    assert any(not torch.equal(before[n], after_one[n]) for n in before)
    _, _, applied = engine.train_step(1)  # NaN: no update
    assert not applied
    assert all(torch.equal(after_one[n], p) for n, p in engine.base_model.named_parameters())
    engine.start_step = 2
    with pytest.raises(TrainingError, match="2 steps in a row had a non-finite loss"):
        engine.fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [("train", 3), ("skip", 4), ("skip", 5)]


def test_gradient_checkpointing_gives_the_same_losses(tiny_data: Path, tmp_path: Path):
    _engine(tiny_data, tmp_path / "a").fit()
    _engine(tiny_data, tmp_path / "b", gradient_checkpointing=True).fit()
    a, b = read_metrics(tmp_path / "a/metrics.jsonl"), read_metrics(tmp_path / "b/metrics.jsonl")
    assert [r.get("loss") for r in a] == pytest.approx([r.get("loss") for r in b], abs=1e-6)


def test_precision_policy(monkeypatch: pytest.MonkeyPatch):
    cpu = torch.device("cpu")
    assert device_mod.resolve_precision("auto", cpu) is None
    assert device_mod.resolve_precision("fp32", cpu) is None
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(ValueError, match="no native bf16 instructions.*100x slower"):
        device_mod.resolve_precision("bf16", cpu)
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: True)
    assert device_mod.resolve_precision("bf16", cpu) is torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': torch.cuda.is_available"):
            device_mod.resolve_device("cuda")
        with pytest.raises(ValueError, match="device 'cuda:1'"):
            device_mod.resolve_device("cuda:1")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        device_mod.resolve_device("tpu")


@pytest.mark.slow
def test_compile_option_gives_the_same_losses(tiny_data: Path, tmp_path: Path):
    """train.compile=true (inductor on CPU): the same curve as eager, to float rounding; names unchanged."""
    _engine(tiny_data, tmp_path / "eager", steps=3, eval_every=0).fit()
    compiled = _engine(tiny_data, tmp_path / "compiled", steps=3, eval_every=0, compile=True)
    compiled.fit()
    eager_losses = [r["loss"] for r in read_metrics(tmp_path / "eager/metrics.jsonl") if r["kind"] == "train"]
    compiled_losses = [r["loss"] for r in read_metrics(tmp_path / "compiled/metrics.jsonl") if r["kind"] == "train"]
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-4)
    assert (tmp_path / "compiled/checkpoints/step-00000003/model.safetensors").exists()


def test_ctrl_c_stops_between_steps_with_a_checkpoint_and_resume_is_exact(tiny_data: Path, tmp_path: Path):
    """SIGINT during step 3 finishes that step, writes checkpoint 3 and raises KeyboardInterrupt; resuming
    from it ends with exactly the weights of an uninterrupted run."""
    import os
    import signal

    straight = _engine(tiny_data, tmp_path / "straight")
    straight.fit()

    engine = _engine(tiny_data, tmp_path / "interrupted")
    calls = {"n": 0}

    def objective_that_gets_interrupted(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # the 3rd optimizer step's forward
            os.kill(os.getpid(), signal.SIGINT)
        return causal_lm_loss(model, *batch)

    engine.objective = objective_that_gets_interrupted
    # Python's own handler, also when pytest was started with SIGINT ignored (`nohup ... &`): the engine
    # rightly leaves an ignored SIGINT alone, and this test is about the interactive case.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.fit()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was put back
    finally:
        signal.signal(signal.SIGINT, inherited)
    checkpoints = sorted(p.name for p in (tmp_path / "interrupted/checkpoints").glob("step-*"))
    assert checkpoints[-1] == "step-00000003"

    resumed = _engine(tiny_data, tmp_path / "interrupted", resume_from=tmp_path / "interrupted/checkpoints/step-00000003")
    resumed.fit()
    for (name, a), b in zip(resumed.base_model.named_parameters(), straight.base_model.parameters()):
        assert torch.equal(a, b), name
