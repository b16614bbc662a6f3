"""The one training loop. Pretraining, SFT, LoRA, DPO and distillation differ only in what they pass in:

    Engine(model, objective, batches, train_cfg, optim_cfg, schedule_cfg, ...).fit()

- objective(model, batch) -> Loss: the loss summed over the items it scored and their count
  (lmstack.train.objectives.Loss). The engine divides the step's summed loss by the step's total
  count, over all micro-batches and ranks, so the gradient does not depend on how the batch is split.
- batches.micro_batches(step) -> this rank's micro-batches for optimizer step `step`, a pure function
  of the step (lmstack.data.loader), which is what makes resume exact. A source that samples from the
  model (on-policy rollouts for PPO / GRPO) sets `needs_model = True` and is called as
  micro_batches(step, model); its resume is exact when its sampling is seeded from the step.
- the recipe's choices: which parameters train (`trainable`, else the model's requires_grad), the
  optimizer's parameter groups (`param_groups`), and what a checkpoint holds (`store`: the whole model
  as a Hugging Face directory, or only the trainable part, e.g. an adapter).

Per step: for each micro-batch, forward + Loss under the precision policy, backward of its total (with
the gradient all-reduce only on the last micro-batch); totals and counts summed over micro-batches and
ranks; gradients scaled by 1 / count (times the world size that DDP / FSDP averaged over); global-norm
clipping (the norm is logged every step); a non-finite loss or norm skips the update; AdamW step with
the learning rate from the schedule. Dropout randomness is reseeded from (seed, step, rank) at every
step, so it too is a pure function of the step. Rank 0 logs, plots and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from tqdm import tqdm

from lmstack import __version__
from lmstack.device import autocast, resolve_device, resolve_precision
from lmstack.errors import TrainingError
from lmstack.train import checkpoint as ckpt
from lmstack.train.config import OptimConfig, ScheduleConfig, TrainConfig
from lmstack.train.device import keep_freed_cpu_memory, peak_flops
from lmstack.train.distributed import (DistContext, all_reduce_sum, as_local_tensor, full_optimizer_state,
                                      gradient_sync, load_full_optimizer_state, wrap_model)
from lmstack.train.metrics import MetricsLog, mfu
from lmstack.train.objectives.loss import Loss
from lmstack.train.optim import build_optimizer, parameter_groups
from lmstack.train.plot import plot_loss_curve
from lmstack.train.schedule import lr_at, set_lr

Batch = Any  # a tensor, or a tuple / list / dict of tensors
Objective = Callable[[nn.Module, Batch], Loss]
ParamGroups = Callable[[nn.Module, OptimConfig], list[dict]]


class BatchSource(Protocol):
    """Where training batches come from: a pure function of the optimizer step (and, for a source with
    `needs_model = True`, of the model being trained: micro_batches(step, model))."""

    tokens_per_step: int  # input tokens in one optimizer step across all ranks (for throughput)

    def micro_batches(self, step: int) -> Sequence[Batch]: ...


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    wall_s: float
    checkpoint: Path | None


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor in a (nested) batch to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch RNG seed for one (step, rank): dropout masks are reproducible from the step alone."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


class Engine:
    """Trains `model` with `objective` on `batches`; see the module docstring."""

    def __init__(self, model: nn.Module, objective: Objective, batches: BatchSource, cfg: TrainConfig,
                 optim_cfg: OptimConfig, schedule_cfg: ScheduleConfig, *, out_dir: str | Path | None = None,
                 val_batches: Sequence[Batch] | None = None, dist: DistContext | None = None,
                 resume_from: str | Path | None = None,
                 trainable: Callable[[str, nn.Parameter], bool] | None = None,
                 param_groups: ParamGroups = parameter_groups, store: ckpt.ModelStore | None = None,
                 run_config: dict[str, Any] | None = None, flops_per_token: float | None = None,
                 make_optimizer: Callable[[nn.Module, OptimConfig, ParamGroups], torch.optim.Optimizer] = build_optimizer):
        """`trainable(name, param)` chooses the parameters that train (None: keep their requires_grad);
        `param_groups(model, optim_cfg)` builds the optimizer's groups from the trainable parameters;
        `store` decides what a checkpoint holds (default: the whole model, ckpt.WholeModel());
        `make_optimizer(model, optim_cfg, param_groups)` builds the optimizer (default torch's AdamW; e.g. an
        8-bit AdamW whose state is smaller)."""
        self.cfg, self.optim_cfg, self.schedule_cfg = cfg, optim_cfg, schedule_cfg
        self.objective, self.batches, self.val_batches = objective, batches, val_batches
        self.dist = dist or DistContext()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.run_config = run_config or {}
        self.store = store or ckpt.WholeModel()
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
        if self.device.type == "cpu":
            keep_freed_cpu_memory()
        self.start_step, self.best_val_loss, self.nonfinite_streak = 0, math.inf, 0
        self.step_metrics: dict[str, float] = {}
        self.val_metrics: dict[str, float] = {}
        if trainable is not None:
            for name, param in model.named_parameters():
                param.requires_grad_(bool(trainable(name, param)))

        checkpoint = ckpt.load_checkpoint(resume_from, self.store) if resume_from is not None else None
        if checkpoint is not None:  # weights go in before wrapping: FSDP shards whatever the model holds then
            self.store.load_into(model, checkpoint.model_state, checkpoint.path)
            self._restore_counters(checkpoint.trainer_state)
        self.base_model = model  # parameter names without DDP's "module." prefix
        if hasattr(model, "gradient_checkpointing"):
            model.gradient_checkpointing = cfg.gradient_checkpointing
        model.to(self.device)
        if cfg.compile:
            model.compile()  # in place: parameter names (and so checkpoints) are unchanged
        self.model = wrap_model(model, cfg.distributed, self.dist, self.device)
        self.optimizer = make_optimizer(model, optim_cfg, param_groups)
        if checkpoint is not None:
            load_full_optimizer_state(model, self.optimizer, checkpoint.optimizer_state)
        if flops_per_token is None and hasattr(model, "config"):
            from lmstack.model.cost import model_cost
            flops_per_token = model_cost(model.config, context=cfg.seq_len).training_flops_per_token
        self.flops_per_token = flops_per_token
        self.peak_flops = cfg.peak_flops or (peak_flops(self.device, self.autocast_dtype) if self.dist.is_main else None)
        self._peak_measured_at = 0  # the step of the last measurement (see _utilisation)

    def _restore_counters(self, state: dict[str, Any]) -> None:
        self.start_step = int(state["step"])
        self.best_val_loss = float(state.get("best_val_loss") or math.inf)
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        state_fn = getattr(self.batches, "state_dict", None)
        saved_data, data_now = state.get("data", {}), state_fn(self.start_step) if state_fn else {}
        changed = [k for k in ("seed", "seq_len", "global_batch_windows") if k in saved_data and k in data_now
                   and saved_data[k] != data_now[k]]
        if changed and self.dist.is_main:
            print(f"lmstack: resuming with a different {', '.join(changed)} than the checkpoint's "
                  f"({', '.join(f'{k}={saved_data[k]}' for k in changed)}): the run continues, but not exactly as "
                  "the interrupted one would have")
        saved_world = state.get("world_size", 1)
        if saved_world != self.dist.world_size and self.dist.is_main:
            print(f"lmstack: resuming a {saved_world}-process checkpoint with {self.dist.world_size} processes; "
                  "weights and optimizer state are unsharded, so this is exact if the global batch is unchanged")

    # ------------------------------------------------------------------------------------------ one step
    def micro_batches(self, step: int) -> Sequence[Batch]:
        """This rank's micro-batches for `step`; an on-policy source also gets the model (in eval mode)."""
        if not getattr(self.batches, "needs_model", False):
            return self.batches.micro_batches(step)
        self.model.eval()
        try:
            return self.batches.micro_batches(step, self.base_model)
        finally:
            self.model.train()

    def compute_gradients(self, step: int) -> tuple[float, float]:
        """Forward and backward over the step's micro-batches -> (mean loss, items scored), over all ranks.

        Afterwards each trainable parameter's .grad is the gradient of the mean loss over every item the
        step scored on every rank: the summed losses' gradients, divided once by the total count.
        """
        micro_batches = self.micro_batches(step)
        self.model.train()
        torch.manual_seed(step_seed(self.cfg.seed, step, self.dist.rank))
        sums = _Sums(self.device)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with gradient_sync(self.model, enabled=last):
                with autocast(self.device, self.autocast_dtype):
                    loss = self.objective(self.model, to_device(batch, self.device))
                loss.total.backward()
            sums.add(loss)
        total, count, self.step_metrics = sums.reduce(self.dist)
        # DDP / FSDP averaged the summed gradients over ranks: make them the mean over the step's items
        params = [p for p in self.base_model.parameters() if p.grad is not None]
        scale_gradients(params, self.dist.world_size / max(count, 1.0))
        return total / max(count, 1.0), count

    def train_step(self, step: int) -> tuple[float, float, bool]:
        """One optimizer step -> (mean loss over the step's scored items on all ranks, gradient norm, applied?)."""
        set_lr(self.optimizer, lr_at(step, self.optim_cfg.lr, self.schedule_cfg, self.cfg.steps))
        loss_value, _ = self.compute_gradients(step)
        params = [p for p in self.base_model.parameters() if p.grad is not None]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip is not None else math.inf
        norm_value = as_local_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)).item()
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)  # the same on every rank
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value, finite

    @torch.no_grad()
    def evaluate(self) -> float:
        """The objective over the fixed validation batches: summed losses / scored items, over all ranks."""
        self.model.eval()
        sums = _Sums(self.device)
        for batch in self.val_batches:
            with autocast(self.device, self.autocast_dtype):
                sums.add(self.objective(self.model, to_device(batch, self.device)))
        self.model.train()
        total, count, metrics = sums.reduce(self.dist)
        self.val_metrics = metrics  # the objective's metrics over the validation set (e.g. accuracy), logged as val_*
        return total / max(count, 1.0)

    def _utilisation(self, tokens_per_s: float, step: int) -> float | None:
        """MFU against the peak. A peak measured while the machine was busy (e.g. at start-up) is too low
        and would show more than 100%: then it is measured again (at most every 50 steps), keeping the higher."""
        utilisation = mfu(tokens_per_s, self.flops_per_token or 0, self.peak_flops, self.dist.world_size)
        if (utilisation is not None and utilisation > 1.0 and self.cfg.peak_flops is None
                and self.device.type == "cpu" and (step - self._peak_measured_at >= 50 or not self._peak_measured_at)):
            self.peak_flops = max(self.peak_flops, peak_flops(self.device, self.autocast_dtype))
            self._peak_measured_at = step or 1
            utilisation = mfu(tokens_per_s, self.flops_per_token or 0, self.peak_flops, self.dist.world_size)
        return utilisation

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        cfg, main = self.cfg, self.dist.is_main
        log = MetricsLog(self.out_dir, self.start_step if self.start_step else None, cfg.tensorboard) \
            if main and self.out_dir is not None else None
        bar = tqdm(total=cfg.steps, initial=self.start_step, disable=not (main and cfg.progress), unit="step",
                   dynamic_ncols=True, desc="train")
        with self._stop_on_interrupt() as interrupted:
            return self._loop(log, bar, interrupted)

    @contextlib.contextmanager
    def _stop_on_interrupt(self):
        """Ctrl-C ends the run *between* steps with a checkpoint, never in the middle of an optimizer update.

        The first SIGINT sets a flag the loop checks after each step; a second one interrupts at once.
        Only in single-process runs: under torchrun the ranks could stop at different steps and hang in
        the checkpoint's collectives, so there Ctrl-C keeps its default meaning.
        """
        flag = threading.Event()
        if self.dist.enabled or self.out_dir is None or threading.current_thread() is not threading.main_thread():
            yield flag
            return

        def handler(signum, frame):
            flag.set()
            signal.signal(signal.SIGINT, previous)
            tqdm.write("interrupt: finishing this step and writing a checkpoint (Ctrl-C again to stop at once)")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield flag
        finally:
            signal.signal(signal.SIGINT, previous)

    def _loop(self, log: MetricsLog | None, bar: tqdm, interrupted: threading.Event) -> TrainResult:
        cfg, main = self.cfg, self.dist.is_main
        tokens_per_step = self.batches.tokens_per_step
        started, last_loss, val_loss, saved = time.perf_counter(), None, None, None
        try:
            for step in range(self.start_step, cfg.steps):
                t0 = time.perf_counter()
                loss, grad_norm, applied = self.train_step(step)
                dt = time.perf_counter() - t0
                done = step + 1
                if not applied:
                    self.nonfinite_streak += 1
                    if log:
                        log.log({"kind": "skip", "step": done, "loss": _json_float(loss),
                                 "grad_norm": _json_float(grad_norm), "reason": "non-finite loss or gradient norm"})
                    if main:
                        tqdm.write(f"step {done}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                                   f"update skipped ({self.nonfinite_streak} in a row)")
                    if self.nonfinite_streak >= cfg.max_nonfinite:
                        raise TrainingError(f"stopping at step {done}: {self.nonfinite_streak} steps in a row had a "
                                            "non-finite loss or gradient norm (lower optim.lr, set train.grad_clip, "
                                            "or check the data)")
                else:
                    self.nonfinite_streak, last_loss = 0, loss
                    tokens_per_s = tokens_per_step / dt
                    utilisation = self._utilisation(tokens_per_s, step)
                    if log and (done % cfg.log_every == 0 or done == cfg.steps):
                        log.log({"kind": "train", "step": done, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                                 "grad_norm": grad_norm, "tokens": done * tokens_per_step, "tokens_per_s": tokens_per_s,
                                 "mfu": utilisation, "step_s": dt, "elapsed_s": time.perf_counter() - started,
                                 **self.step_metrics})
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}",
                                    mfu="-" if utilisation is None else f"{100 * utilisation:.1f}%", refresh=False)
                bar.update(1)
                val_now = None
                if self.val_batches and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
                    val_loss = val_now = self.evaluate()
                    # perplexity only where the loss is a token NLL (not a classification or preference loss)
                    ppl = {"ppl": math.exp(min(val_loss, 700))} if getattr(self.objective, "loss_is_token_nll", True) else {}
                    if log:
                        log.log({"kind": "eval", "step": done,  # the objective's metrics never replace val_loss
                                 **{f"val_{name}": value for name, value in self.val_metrics.items()},
                                 "val_loss": val_loss, **{f"val_{name}": value for name, value in ppl.items()}})
                    if main:
                        tqdm.write(f"step {done}: val loss {val_loss:.4f}"
                                   + "".join(f", {name} {value:.4f}" for name, value in self.val_metrics.items())
                                   + "".join(f", perplexity {value:.2f}" for value in ppl.values()))
                if self.out_dir is not None and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
                                                 or done == cfg.steps):
                    saved = self.save(done, val_now)
                    if log and done < cfg.steps:  # the curve so far, next to the checkpoint (the final one: below)
                        plot_loss_curve(log.records, self.out_dir / "loss.png", title=str(self.out_dir))
                if interrupted.is_set():
                    if saved != ckpt.step_dir(self.out_dir / "checkpoints", done):
                        saved = self.save(done, val_now)
                    tqdm.write(f"stopped at step {done}; checkpoint {saved}; --resume continues from it")
                    raise KeyboardInterrupt
        finally:
            bar.close()
            if log:
                if log.records:
                    plot_loss_curve(log.records, self.out_dir / "loss.png", title=str(self.out_dir))
                log.close()
        best = self.best_val_loss if math.isfinite(self.best_val_loss) else None
        return TrainResult(cfg.steps, last_loss, val_loss, best, time.perf_counter() - started, saved)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self, step: int, val_loss: float | None) -> Path:
        """Write checkpoint `step` (all ranks gather the state; rank 0 writes; all wait for it)."""
        model_state = self.store.state(self.base_model)
        optimizer_state = full_optimizer_state(self.base_model, self.optimizer)
        root = self.out_dir / "checkpoints"
        path = ckpt.step_dir(root, step)
        is_best = val_loss is not None and val_loss < self.best_val_loss
        if is_best:
            self.best_val_loss = val_loss
        if self.dist.is_main:
            state_fn = getattr(self.batches, "state_dict", None)
            trainer_state = {
                "step": step, "tokens_seen": step * self.batches.tokens_per_step, "val_loss": val_loss,
                "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
                "nonfinite_streak": self.nonfinite_streak, "world_size": self.dist.world_size, "seed": self.cfg.seed,
                "data": state_fn(step) if state_fn else {"next_step": step},
                "rng": {"scheme": "torch.manual_seed(SeedSequence([seed, step, rank])) before every step"},
                "lmstack_version": __version__, "run_config": self.run_config,
            }
            ckpt.save_checkpoint(path, self.store, self.base_model, model_state, optimizer_state, trainer_state)
            if is_best:
                ckpt.record_best(root, path, val_loss, step)
            ckpt.prune_checkpoints(root, self.cfg.keep_last)
            ckpt.update_links(root)
        if self.dist.enabled:
            torch_dist.barrier()
        return path


class _Sums:
    """One step's loss totals, counts and metric sums over its micro-batches, kept on the device (no sync)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.values = torch.zeros(2, dtype=torch.float64, device=device)  # [total, count]
        self.metrics: dict[str, torch.Tensor] = {}

    def add(self, loss: Loss) -> None:
        self.values[0] += loss.total.detach().double()
        self.values[1] += torch.as_tensor(loss.count, device=self.device).double()
        for name, value in loss.metrics.items():
            value = torch.as_tensor(value, device=self.device).detach().double()
            self.metrics[name] = self.metrics.get(name, 0) + value

    def reduce(self, dist: DistContext) -> tuple[float, float, dict[str, float]]:
        """(total, count, {metric: sum / count}) over all ranks: one all-reduce, one host sync."""
        names = sorted(self.metrics)
        packed = torch.cat([self.values, *(self.metrics[n].reshape(1) for n in names)])
        total, count, *metrics = all_reduce_sum(packed, dist).tolist()
        return total, count, {name: value / max(count, 1.0) for name, value in zip(names, metrics)}


def scale_gradients(params: list[nn.Parameter], factor: float) -> None:
    """Multiply every gradient by `factor` in place (fused per device for plain tensors)."""
    if factor == 1.0 or not params:
        return
    grads = [p.grad for p in params]
    if all(type(g) is torch.Tensor for g in grads):
        torch._foreach_mul_(grads, factor)
    else:  # FSDP2's DTensor gradients
        for g in grads:
            g.mul_(factor)


def _json_float(value: float) -> float | str:
    """JSON has no NaN/inf: write them as strings."""
    return value if math.isfinite(value) else str(value)
