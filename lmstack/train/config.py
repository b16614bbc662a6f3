"""Typed configs for training. The dataclasses are the schema (lmstack.schema loads them strictly).

A pretraining YAML is a `PretrainConfig`: sections `model`, `data`, `optim`, `schedule`, `train`
and the top-level `out_dir`. Every field has a default, so a recipe names only what it changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lmstack.data.mlm import MaskingConfig
from lmstack.data.span import SpanConfig
from lmstack.errors import ConfigError


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay (Loshchilov & Hutter)."""

    lr: float = 3e-4  # peak learning rate, reached at the end of warmup
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only; norms and biases never decay
    decay_embeddings: bool = False  # also decay token/position embeddings (a tied lm_head is the embedding)
    implementation: Literal["auto", "foreach", "fused", "for-loop"] = "auto"  # torch AdamW kernel choice

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class ScheduleConfig:
    """Learning rate as a function of the optimizer step: linear warmup, then a decay to `min_lr`.

    kind: "cosine" (half cosine), "linear", "wsd" (warmup-stable-decay: constant, then a linear decay
    over the last `wsd_decay_fraction` of the decay horizon), or "constant" (warmup only).
    decay_steps: the step at which the decay reaches `min_lr` (null = the run's total steps).
    """

    kind: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    warmup_steps: int = 0
    decay_steps: int | None = None
    min_lr: float = 0.0  # absolute learning rate at the end of the decay
    wsd_decay_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ConfigError(f"schedule.decay_steps ({self.decay_steps}) must exceed warmup_steps "
                              f"({self.warmup_steps})")
        if not 0.0 < self.wsd_decay_fraction <= 1.0:
            raise ConfigError(f"schedule.wsd_decay_fraction must be in (0, 1], got {self.wsd_decay_fraction}")
        if self.min_lr < 0:
            raise ConfigError(f"schedule.min_lr must be >= 0, got {self.min_lr}")


@dataclass
class TrainConfig:
    """The loop: how many steps, how big, how precise, how often to evaluate, log and checkpoint."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # windows per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256  # tokens per window
    grad_clip: float | None = 1.0  # global L2 norm; null = no clipping (the norm is still logged)
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False  # torch.compile the model
    gradient_checkpointing: bool = False  # recompute each block in backward
    distributed: Literal["ddp", "fsdp"] = "ddp"  # strategy under torchrun (world size > 1)
    eval_every: int = 200  # 0 = only at the end
    eval_windows: int = 512  # validation windows (a fixed set), at most
    log_every: int = 1
    checkpoint_every: int = 0  # 0 = only at the end
    keep_last: int = 2  # checkpoints kept besides the best one
    max_nonfinite: int = 5  # stop after this many non-finite steps in a row
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = False  # also write TensorBoard events (needs the tensorboard package)
    threads: int | None = None  # torch intra-op threads; null = torch's default (all cores, or OMP_NUM_THREADS)
    peak_flops: float | None = None  # per-device FLOP/s for MFU; null = measured (CPU) or looked up (CUDA)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "keep_last", "max_nonfinite",
                     "eval_windows"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"train.threads must be positive or null, got {self.threads}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"train.grad_clip must be positive or null, got {self.grad_clip}")


@dataclass
class DataConfig:
    """Token shards written by `lmstack data prepare` (DIR/train, DIR/val, DIR/tokenizer)."""

    path: str = ""


@dataclass
class QATConfig:
    """`qat:` in a pretrain / finetune config: train with fake-quantized linears, write OUT/quantized/ at the end
    (lmstack/train/qat.py). layers: names or suffixes (q_proj, mlp.down_proj); empty: every block linear."""

    bits: int = 4  # 8, 4 or 3
    group_size: int | None = 128  # None: one scale per output channel
    symmetric: bool = False
    layers: list[str] = field(default_factory=list)


@dataclass
class PretrainConfig:
    """`lmstack pretrain --config X.yaml`: everything a pretraining run needs.

    model: a mapping of ModelConfig fields, optionally with `preset: NAME` to start from a preset;
    vocab_size and eos_token_id default to the data's.
    objective: "clm" (next token, a decoder), "mlm" / "mlm+nsp" (BERT: an encoder; `masking`) or "span" (T5
    span corruption: an encoder-decoder; `spans`); for the last three `model` holds EncoderConfig / Seq2SeqConfig
    fields (lmstack.train.recipes.denoising).
    """

    out_dir: str = "runs/pretrain"
    objective: Literal["clm", "mlm", "mlm+nsp", "span"] = "clm"
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    spans: SpanConfig = field(default_factory=SpanConfig)
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    qat: QATConfig | None = None
