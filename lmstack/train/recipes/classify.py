"""Fine-tuning an encoder for sequence classification: ClassifyConfig -> an Engine (`lmstack finetune` with
`task: classification`).

    model:  a BERT-family directory: a Hugging Face BERT / sentence-transformers directory (e.g. all-MiniLM-L6-v2)
            or an lmstack encoder checkpoint (`lmstack pretrain --objective=mlm`); its heads are replaced by a
            pooler (kept when the base has one) and a fresh `classifier` of num_labels outputs
    data:   JSONL {"text", "label"[, "text_pair"]} (lmstack.data.classify); num_labels from the data unless set
    method: full  every weight trains; checkpoints are BertForSequenceClassification directories
            lora  LoRA on `query` / `value` (peft's BERT targets); the classifier (and a pooler the base lacks)
                  trains in full as modules_to_save; checkpoints are peft adapter directories (task_type SEQ_CLS)

The objective is cross-entropy over the rows (objectives.classification); metrics.jsonl logs `accuracy` per
step and `val_loss` / `val_accuracy` at each evaluation. Written under out_dir: config.yaml, data_report.json,
metrics.jsonl, checkpoints/step-N/ (with the tokenizer), as the instruction-tuning recipe does.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from lmstack.adapters import AdapterStore, LoraConfig, apply_lora
from lmstack.data.classify import (
    ClassifyBatches,
    ClassifyDataConfig,
    encode_examples,
    label_names,
    read_labelled,
    validation_batches,
)
from lmstack.device import resolve_device
from lmstack.errors import ConfigError, DataError
from lmstack.interop.hf import load_model
from lmstack.model.configs import EncoderConfig, architecture_preset
from lmstack.model.encoder import Encoder
from lmstack.schema import to_dict
from lmstack.tokenizer import Tokenizer
from lmstack.train.checkpoint import begin_run, write_run_record
from lmstack.train.config import OptimConfig, ScheduleConfig, TrainConfig
from lmstack.train.distributed import DistContext, init_distributed, shutdown_distributed
from lmstack.train.engine import Engine, TrainResult
from lmstack.train.objectives.classification import sequence_classification_loss
from lmstack.train.recipes.denoising import WholeOtherModel


def _lora_default() -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16.0, lora_dropout=0.1, target_modules=["query", "value"])


@dataclass
class ClassifyConfig:
    """`lmstack finetune --config X.yaml` with `task: classification`: an encoder, labelled texts, a method.

    num_labels: the classifier's outputs; default: the number of label names, or the largest integer label + 1.
    epochs: when set, train.steps becomes ceil(epochs * examples / rows per step).
    """

    task: Literal["classification"] = "classification"
    out_dir: str = "runs/classify"
    model: str = ""
    tokenizer: str | None = None
    method: Literal["full", "lora"] = "full"
    lora: LoraConfig = field(default_factory=_lora_default)
    num_labels: int | None = None
    epochs: float | None = None
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, betas=(0.9, 0.999), weight_decay=0.01))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=10))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200, batch_size=16, seq_len=128,
                                                                   eval_every=50))


# ------------------------------------------------------------------------------------------- model
def classifier_model(source: str, num_labels: int, labels: list[str] | None) -> Encoder:
    """The base encoder with a classifier head of num_labels outputs: the trunk (and pooler) from the base, the
    classifier kept only when the base already has one of that size, otherwise freshly initialised."""
    if not source:
        raise ConfigError("model is required: a BERT-family directory (e.g. --model=PATH_TO_MINILM) or an encoder preset")
    base = load_model(source) if Path(source).is_dir() else None
    if base is None:
        config = architecture_preset(source)
        if not isinstance(config, EncoderConfig):
            raise ConfigError(f"model: {source!r} is neither a model directory nor an encoder preset")
        base = Encoder(config)
    if not isinstance(base, Encoder):
        raise ConfigError(f"model: {source} is a {type(base).__name__}; classification fine-tuning needs a BERT-family "
                          "encoder (a BERT / MiniLM directory or an `lmstack pretrain --objective=mlm` checkpoint)")
    config = base.config.replace(heads=["classifier"], num_labels=num_labels, labels=labels, pooler=True)
    model = Encoder(config)
    state = {k: v for k, v in base.state_dict().items() if k.startswith("bert.")}
    if "classifier" in base.config.heads and base.config.num_labels == num_labels:
        state.update({k: v for k, v in base.state_dict().items() if k.startswith("classifier.")})
    model.load_state_dict(state, strict=False)
    model.base_has_pooler = base.config.pooler  # a pooler the base lacks is new: LoRA must train and save it
    return model


def prepare_model(cfg: ClassifyConfig, num_labels: int, labels: list[str] | None) -> nn.Module:
    model = classifier_model(cfg.model, num_labels, labels)
    if cfg.method == "full":
        return model.requires_grad_(True)
    extra = ["classifier"] + ([] if model.base_has_pooler else ["bert.pooler.dense"])
    lora = replace(cfg.lora, modules_to_save=list(dict.fromkeys([*cfg.lora.modules_to_save, *extra])))
    apply_lora(model, lora)
    return model


# ------------------------------------------------------------------------------------------- data
def load_splits(cfg: ClassifyDataConfig) -> tuple[list, list]:
    if not cfg.train:
        raise ConfigError("data.train is required: JSONL files of {\"text\": ..., \"label\": ...}")
    train = read_labelled(cfg.train, cfg, cfg.max_samples)
    if not train:
        raise DataError(f"data.train {cfg.train}: no records")
    if cfg.val:
        return train, read_labelled(cfg.val, cfg)
    if cfg.val_fraction > 0:
        order = np.random.default_rng([cfg.seed, 1]).permutation(len(train))
        held = set(order[:max(1, round(cfg.val_fraction * len(train)))].tolist())
        return [r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held]
    return train, []


def _special(tokenizer: Tokenizer, source: str) -> tuple[int, int, int]:
    cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if cls is None or sep is None:
        raise ConfigError(f"{source}: the tokenizer has no [CLS] / [SEP] (or bos / eos) token to frame the texts")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return cls, sep, pad


# ------------------------------------------------------------------------------------------- the engine
def build_engine(cfg: ClassifyConfig, resume: bool = False, dist: DistContext | None = None) -> Engine:
    dist = dist or DistContext()
    out_dir, t = Path(cfg.out_dir), cfg.train
    resume_from = begin_run(t, out_dir, resume)
    source = cfg.tokenizer or cfg.model
    if not source or not Path(source).is_dir():
        raise ConfigError(f"tokenizer: {source!r} is not a tokenizer directory; set `tokenizer:` (a model directory "
                          "holds one)")
    tokenizer = Tokenizer.load(source)
    cls, sep, pad = _special(tokenizer, source)

    train_records, val_records = load_splits(cfg.data)
    names = label_names(train_records, cfg.data.labels)
    if cfg.num_labels is not None:
        num_labels = cfg.num_labels
    elif names is not None:
        num_labels = len(names)
    else:
        num_labels = max(r[3] for r in train_records) + 1
    if names is not None and len(names) != num_labels:
        raise ConfigError(f"num_labels ({num_labels}) differs from the {len(names)} label names {names}")
    torch.manual_seed(t.seed)
    model = prepare_model(cfg, num_labels, names)
    if t.seq_len > model.config.max_seq_len:
        raise ConfigError(f"train.seq_len ({t.seq_len}) exceeds the encoder's max_seq_len ({model.config.max_seq_len})")
    examples, truncated = encode_examples(tokenizer, train_records, names, num_labels, t.seq_len, cls, sep)
    val_examples, _ = encode_examples(tokenizer, val_records, names, num_labels, t.seq_len, cls, sep)
    batches = ClassifyBatches(examples, t.batch_size, t.grad_accum, pad, t.seed, dist.rank, dist.world_size)
    val = validation_batches(val_examples, t.batch_size, pad, dist.rank, dist.world_size) if val_examples else None
    if cfg.epochs is not None:
        t = cfg.train = replace(t, steps=max(1, math.ceil(cfg.epochs * batches.steps_per_epoch())))

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    counts = np.bincount([e.label for e in examples], minlength=num_labels).tolist()
    report = {"train_examples": len(examples), "validation_examples": len(val_examples), "truncated": truncated,
              "num_labels": num_labels, "labels": names, "train_label_counts": counts,
              "majority_accuracy_val": (max(np.bincount([e.label for e in val_examples], minlength=num_labels))
                                        / len(val_examples)) if val_examples else None,
              "trainable_parameters": trainable, "total_parameters": total, "steps": t.steps,
              "epochs": round(t.steps / batches.steps_per_epoch(), 3)}
    run_config = to_dict(cfg)
    files = write_run_record(out_dir, tokenizer, run_config, report, main=dist.is_main)
    if dist.is_main:
        print(f"lmstack finetune: classification ({num_labels} labels), {cfg.method}, {trainable:,} of {total:,} "
              f"parameters train; {len(examples)} train / {len(val_examples)} validation examples ({truncated} "
              f"truncated); {t.steps} steps ({report['epochs']} epochs)"
              + (f", resuming from {resume_from}" if resume_from else ""), file=sys.stderr)
    store = WholeOtherModel(extra_files=files) if cfg.method == "full" else \
        AdapterStore(base_model_name_or_path=str(Path(cfg.model).resolve()) if Path(cfg.model).is_dir() else cfg.model,
                     extra_files=files)
    # 6 N per token for the trunk (2/3 of it for LoRA, which computes no weight gradients for the frozen base)
    flops = 6 * model.num_parameters(exclude_embeddings=True) * (1.0 if cfg.method == "full" else 2 / 3)
    return Engine(model, sequence_classification_loss, batches, t, cfg.optim, cfg.schedule, out_dir=out_dir,
                  val_batches=val, dist=dist, resume_from=resume_from, store=store, run_config=run_config,
                  flops_per_token=float(flops))


def run(cfg: ClassifyConfig, resume: bool = False) -> TrainResult:
    dist = init_distributed(resolve_device(cfg.train.device).type)
    try:
        return build_engine(cfg, resume, dist).fit()
    finally:
        shutdown_distributed()


__all__ = ["ClassifyConfig", "build_engine", "classifier_model", "load_splits", "prepare_model", "run"]
