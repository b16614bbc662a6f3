"""The distillation recipe: DistillConfig -> an Engine that trains a student on token shards against a teacher.

    lmstack distill --config configs/distill-tiny.yaml [--distill.alpha=0 (the same student from scratch) ...]

The data are the non-overlapping windows of the train split, one epoch a shuffle of them (a pure function of
the step, so resume is exact). With `distill.top_k`, the teacher runs once over every window before training
and its top-k logits are cached in OUT/teacher_topk.safetensors (reused by a later run over the same data,
teacher and window length); otherwise it runs beside the student on every batch. alpha = 0 is plain
pretraining of the student on the same windows: the from-scratch baseline of a comparison.

Writes OUT/config.yaml, metrics.jsonl, loss.png and checkpoints/step-N/ (the student: a Hugging Face directory).
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from lmstack.atomic import atomic_file, write_text
from lmstack.data.loader import TokenStream, validation_batches
from lmstack.device import resolve_device
from lmstack.errors import ConfigError
from lmstack.interop.hf import load_model
from lmstack.model.transformer import Transformer
from lmstack.schema import to_dict
from lmstack.train.checkpoint import WholeModel, begin_run
from lmstack.train.config import DataConfig, OptimConfig, ScheduleConfig, TrainConfig
from lmstack.train.engine import Engine, TrainResult
from lmstack.train.objectives.distill import TopK, check_vocabularies, distill_objective
from lmstack.train.recipes.pretrain import _tokenizer_files, build_model_config


@dataclass
class DistillSettings:
    """temperature T and alpha (the soft term's weight); kind forward (KL(teacher || student)) or reverse (KL on the
    student's samples, MiniLLM-style: prompt_len tokens of each window, then sample_len sampled ones); top_k:
    cache the teacher's k largest logits per position (None: run the teacher on every batch); max_windows: use
    only the first N windows of the train split (a short run's epoch, and a smaller cache)."""

    temperature: float = 2.0
    alpha: float = 0.5
    kind: Literal["forward", "reverse"] = "forward"
    top_k: int | None = None
    prompt_len: int = 16
    sample_len: int = 32
    max_windows: int | None = None


@dataclass
class DistillConfig:
    """teacher: a model directory. student: ModelConfig fields (with `preset:`), as pretrain's `model:`;
    or student_init: a model directory to start the student from."""

    out_dir: str = "runs/distill"
    teacher: str = ""
    student: dict[str, Any] = field(default_factory=dict)
    student_init: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillSettings = field(default_factory=DistillSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class WindowBatches:
    """Non-overlapping windows of a split; epoch e visits them in a permutation seeded by (seed, e). Each
    micro-batch: input_ids, targets (B, T) and window (B,) (the index into a top-k cache)."""

    def __init__(self, stream: TokenStream, seq_len: int, batch_size: int, grad_accum: int = 1, seed: int = 0,
                 max_windows: int | None = None):
        self.stream, self.seq_len, self.batch_size, self.grad_accum, self.seed = (stream, seq_len, batch_size,
                                                                                  grad_accum, seed)
        self.count = min((len(stream) - 1) // seq_len, max_windows or 1 << 62)
        self.rows_per_step = batch_size * grad_accum
        if self.count < self.rows_per_step:
            raise ConfigError(f"{stream.directory}: {self.count} windows of {seq_len} tokens, fewer than one step's "
                              f"{self.rows_per_step}")
        self.tokens_per_step = self.rows_per_step * seq_len

    def window(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.stream.windows(index * self.seq_len, self.seq_len)

    def state_dict(self, step: int) -> dict[str, int]:
        return {"next_step": step, "seed": self.seed, "seq_len": self.seq_len, "windows": self.count}

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        start, rows = step * self.rows_per_step, []
        while len(rows) < self.rows_per_step:
            epoch, offset = divmod(start + len(rows), self.count)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.count)
            rows.extend(order[offset:offset + self.rows_per_step - len(rows)].tolist())
        out = []
        for i in range(0, self.rows_per_step, self.batch_size):
            index = np.array(rows[i:i + self.batch_size])
            inputs, targets = self.window(index)
            out.append({"input_ids": inputs, "targets": targets, "window": torch.from_numpy(index)})
        return out


# ------------------------------------------------------------------------------------------- the teacher's cache
def teacher_topk(teacher: nn.Module, batches: WindowBatches, k: int, path: Path, key: str,
                 batch_size: int = 16) -> TopK:
    """Top-k logits of the teacher over every window, computed once and kept in `path` (safetensors, fp32 values,
    int32 ids); a file made for other data, teacher, window length or k (its `key`) is recomputed."""
    if path.is_file():
        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return TopK(f.get_tensor("values"), f.get_tensor("indices"))
    device = next(teacher.parameters()).device
    values, indices = [], []
    teacher.eval()
    with torch.no_grad():
        for start in range(0, batches.count, batch_size):
            inputs, _ = batches.window(np.arange(start, min(start + batch_size, batches.count)))
            top = teacher(inputs.to(device)).float().topk(k, dim=-1)  # (b, T, k)
            values.append(top.values.cpu())
            indices.append(top.indices.to(torch.int32).cpu())
    cache = TopK(torch.cat(values), torch.cat(indices))
    with atomic_file(path, "wb") as f:
        f.write(save({"values": cache.values, "indices": cache.indices}, metadata={"key": key}))
    return cache


def _cache_key(cfg: DistillConfig, teacher: nn.Module, stream: TokenStream) -> str:
    h = hashlib.sha256(f"{Path(cfg.teacher).resolve()}|{cfg.distill.top_k}|{cfg.train.seq_len}|"
                       f"{stream.directory.resolve()}|{len(stream)}|{cfg.distill.max_windows}".encode())
    h.update(next(teacher.parameters()).detach().float().flatten()[:4096].numpy().tobytes())
    return h.hexdigest()


def student_sampler(settings: DistillSettings):
    """(student, input_ids (B, T)) -> the first prompt_len tokens of each row + sample_len tokens the student
    samples (temperature 1), and the mask of the sampled positions' predictions to score."""

    def sample(student: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        was = student.training
        student.eval()
        ids = inputs[:, :settings.prompt_len]
        for _ in range(settings.sample_len):  # a plain loop: samples of a small student, no KV cache needed
            probs = torch.softmax(student(ids)[:, -1].float(), dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1)], dim=1)
        student.train(was)
        scored = torch.zeros_like(ids, dtype=torch.bool)
        scored[:, settings.prompt_len - 1:-1] = True  # positions whose next token was sampled
        return ids, scored

    return sample


# ------------------------------------------------------------------------------------------- the engine
def build_engine(cfg: DistillConfig, resume: bool = False) -> Engine:
    out_dir, t, d = Path(cfg.out_dir), cfg.train, cfg.distill
    resume_from = begin_run(t, out_dir, resume)
    device = resolve_device(t.device)
    if not cfg.data.path:
        raise ConfigError("data.path is required: token shards written by `lmstack data prepare`")
    data_dir = Path(cfg.data.path)
    stream = TokenStream(data_dir / "train")
    val_stream = TokenStream(data_dir / "val") if (data_dir / "val" / "index.json").exists() else None
    torch.manual_seed(t.seed)
    student = (load_model(cfg.student_init) if cfg.student_init else
               Transformer(build_model_config(cfg.student, stream.info.vocab_size, stream.info.eos_token_id)))
    teacher = None
    if d.alpha > 0:
        if not cfg.teacher:
            raise ConfigError("teacher: a model directory is required when distill.alpha > 0")
        teacher = load_model(cfg.teacher).to(device).eval().requires_grad_(False)
        check_vocabularies(teacher, student)
    if t.seq_len > student.config.max_seq_len:
        raise ConfigError(f"train.seq_len ({t.seq_len}) exceeds the student's max_seq_len ({student.config.max_seq_len})")
    if d.kind == "reverse" and d.prompt_len + d.sample_len > student.config.max_seq_len:
        raise ConfigError("distill.prompt_len + sample_len exceed the student's max_seq_len")
    batches = WindowBatches(stream, t.seq_len, t.batch_size, t.grad_accum, t.seed, d.max_windows)
    cache = None
    if teacher is not None and d.top_k:
        if d.kind == "reverse":
            raise ConfigError("distill.top_k caches the teacher on the data; kind reverse scores the student's own "
                              "samples, which need the live teacher: unset top_k")
        out_dir.mkdir(parents=True, exist_ok=True)
        cache = teacher_topk(teacher, batches, d.top_k, out_dir / "teacher_topk.safetensors",
                             _cache_key(cfg, teacher, stream))
        teacher = None  # the cache replaces it: no teacher forward during training
    objective = distill_objective(teacher, d.temperature, d.alpha, d.kind, cache,
                                  student_sampler(d) if d.kind == "reverse" else None)
    val = None
    if val_stream is not None:
        val = [{"input_ids": x, "targets": y}  # evaluated as plain CE (the objective in eval mode): the student's ppl
               for x, y in validation_batches(val_stream, t.seq_len, t.batch_size, t.eval_windows)]
    run_config = to_dict(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "config.yaml", yaml.safe_dump({**run_config, "student": student.config.to_dict()},
                                                      sort_keys=False))
    source = "top-k cache" if cache is not None else ("live teacher" if teacher is not None else "no teacher")
    print(f"lmstack distill: student {student.num_parameters():,} parameters, {d.kind} KL at T={d.temperature}, "
          f"alpha {d.alpha} ({source}), {t.steps} steps of {batches.tokens_per_step:,} tokens "
          f"({math.ceil(t.steps * batches.rows_per_step / batches.count * 100) / 100} epochs)", file=sys.stderr)
    return Engine(student, objective, batches, t, cfg.optim, cfg.schedule, out_dir=out_dir,
                  val_batches=val, resume_from=resume_from, store=WholeModel(extra_files=_tokenizer_files(data_dir)),
                  run_config=run_config)


def run(cfg: DistillConfig, resume: bool = False) -> TrainResult:
    return build_engine(cfg, resume).fit()


__all__ = ["DistillConfig", "DistillSettings", "WindowBatches", "build_engine", "run", "student_sampler",
           "teacher_topk"]
