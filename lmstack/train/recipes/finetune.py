"""The fine-tuning recipe: FinetuneConfig -> an Engine that trains a pretrained model on instruction data.

    method: full    every weight trains; checkpoints are Hugging Face model directories
            lora    LoRA adapters (lmstack.adapters); checkpoints are peft adapter directories
            dora    the same with DoRA's magnitude
            qlora   LoRA on a base whose linears are stored as NF4 (4-bit NormalFloat, double-quantized scales)
            prompt, p_tuning, prefix, ia3, bottleneck   the other parameter-efficient methods (lmstack.adapters),
                    each configured by its own section (prompt_tuning:, p_tuning:, prefix_tuning:, ia3:, bottleneck:)

Written under out_dir: config.yaml (resolved), data_report.json, tokenizer/ (with any chat markers the
base lacked), metrics.jsonl, loss.png and checkpoints/step-N/ (each loadable as it is: by transformers for
`full`, by peft / `lmstack chat --adapter` otherwise).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from torch import nn

from lmstack.adapters import (
    AdapterStore,
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    apply_bottleneck,
    apply_ia3,
    apply_lora,
    apply_p_tuning,
    apply_prefix_tuning,
    apply_prompt_tuning,
    resize_vocab,
)
from lmstack.atomic import write_text
from lmstack.data import instruct_tasks
from lmstack.data.sft import SFTBatches, SFTDataConfig, encode_records, read_records, validation_batches
from lmstack.device import resolve_device, resolve_precision
from lmstack.errors import ConfigError
from lmstack.interop.hf import load_model
from lmstack.model.cost import model_cost
from lmstack.schema import to_dict
from lmstack.tokenizer import Tokenizer
from lmstack.tokenizer.chat_template import TEMPLATE_SPECIAL_TOKENS, resolve_template
from lmstack.train.checkpoint import WholeModel, latest_checkpoint, list_checkpoints
from lmstack.train.config import OptimConfig, ScheduleConfig, TrainConfig
from lmstack.train.distributed import DistContext, init_distributed, shutdown_distributed
from lmstack.train.engine import Engine, TrainResult
from lmstack.train.objectives.sft import sft_loss

Method = Literal["full", "lora", "dora", "qlora", "prompt", "p_tuning", "prefix", "ia3", "bottleneck"]


@dataclass
class FinetuneConfig:
    """`lmstack finetune --config X.yaml`: a base model, instruction data, a method and the usual training sections.

    model: the base, a model directory (Hugging Face or lmstack) or a preset name (random init, for tests).
    tokenizer: a tokenizer directory; default the model directory.
    epochs: when set, train.steps becomes ceil(epochs * rows per epoch / rows per step).
    optimizer: adamw (torch's) or adamw8bit (block-wise 8-bit moments: lmstack.train.optim8bit).
    """

    out_dir: str = "runs/finetune"
    model: str = ""
    tokenizer: str | None = None
    method: Method = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompt_tuning: PromptTuningConfig = field(default_factory=PromptTuningConfig)
    p_tuning: PTuningConfig = field(default_factory=PTuningConfig)
    prefix_tuning: PrefixTuningConfig = field(default_factory=PrefixTuningConfig)
    ia3: IA3Config = field(default_factory=IA3Config)
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    epochs: float | None = None
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, weight_decay=0.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=10))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200, seq_len=512, eval_every=0))


# ------------------------------------------------------------------------------------------- tokenizer and model
def prepare_tokenizer(cfg: FinetuneConfig) -> tuple[Tokenizer, list[str]]:
    """The tokenizer with the configured chat template; -> (tokenizer, special tokens it had to add)."""
    source = cfg.tokenizer or cfg.model
    if not source or not Path(source).is_dir():
        raise ConfigError(f"tokenizer: {source!r} is not a tokenizer directory; set `tokenizer:` (the base model "
                          "directory holds one when it is a Hugging Face or lmstack model)")
    tokenizer = Tokenizer.load(source)
    added: list[str] = []
    name = cfg.data.chat_template
    if name is not None:
        tokenizer.chat_template = resolve_template(name)
        needed = TEMPLATE_SPECIAL_TOKENS.get(name, ())
        added = [t for t in needed if tokenizer.token_to_id(t) is None]
        if added:
            tokenizer.backend.add_special_tokens(added)
            tokenizer.special_tokens = tokenizer.special_tokens.with_extra(added)
    if tokenizer.chat_template is None:
        raise ConfigError(f"{source}: the tokenizer has no chat_template; set data.chat_template (chatml, llama3 or a "
                          "Jinja file)")
    return tokenizer, added


def prepare_model(cfg: FinetuneConfig, tokenizer: Tokenizer) -> tuple[nn.Module, list[int]]:
    """The base model, its vocabulary grown to the tokenizer's (new rows at the mean), the method applied.
    -> (model, ids of the new tokens)."""
    model = load_model(cfg.model)
    old = resize_vocab(model, tokenizer.vocab_size)
    new_ids = list(range(old, model.config.vocab_size))
    if cfg.method == "full":
        model.requires_grad_(True)
        return model, new_ids
    others = {"prompt": lambda: apply_prompt_tuning(model, cfg.prompt_tuning, tokenizer),
              "p_tuning": lambda: apply_p_tuning(model, cfg.p_tuning),
              "prefix": lambda: apply_prefix_tuning(model, cfg.prefix_tuning),
              "ia3": lambda: apply_ia3(model, cfg.ia3), "bottleneck": lambda: apply_bottleneck(model, cfg.bottleneck)}
    if cfg.method in others:  # new tokens' rows keep their mean init (these methods train no rows)
        others[cfg.method]()
        return model, new_ids
    lora = replace(cfg.lora, use_dora=cfg.lora.use_dora or cfg.method == "dora")
    learns_rows = any(m.endswith(("embed_tokens", "lm_head", "wte")) for m in lora.modules_to_save)
    if new_ids and not learns_rows:  # new tokens need trained rows, or the model can never use them
        lora = replace(lora, trainable_token_indices=sorted(set(lora.trainable_token_indices) | set(new_ids)))
    if cfg.method == "qlora":
        from lmstack.adapters.qlora import quantize_base
        quantize_base(model)
    apply_lora(model, lora)
    return model, new_ids


# ------------------------------------------------------------------------------------------- data
def load_records(cfg: SFTDataConfig) -> tuple[list, list]:
    """(train records, validation records) as (where, record) pairs."""
    if not cfg.train:
        raise ConfigError("data.train is required: JSON / JSONL files, or builtin:instruct-tasks")
    if cfg.train == [instruct_tasks.BUILTIN]:
        n = cfg.max_samples or 20000
        train = instruct_tasks.generate_tasks(n, cfg.seed)
        val = instruct_tasks.generate_tasks(max(64, n // 50), cfg.seed + 1, exclude=(r["prompt"] for r in train))
        return ([(f"{instruct_tasks.BUILTIN}[{i}]", r) for i, r in enumerate(train)],
                [(f"{instruct_tasks.BUILTIN}:val[{i}]", r) for i, r in enumerate(val)])
    train = [item for path in cfg.train for item in read_records(path)]
    if cfg.max_samples is not None:
        train = train[:cfg.max_samples]
    if cfg.val:
        return train, [item for path in cfg.val for item in read_records(path)]
    if cfg.val_fraction > 0:
        order = np.random.default_rng([cfg.seed, 1]).permutation(len(train))
        held = set(order[:max(1, round(cfg.val_fraction * len(train)))].tolist())
        return [r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held]
    return train, []


# ------------------------------------------------------------------------------------------- the engine
def build_engine(cfg: FinetuneConfig, resume: bool = False, dist: DistContext | None = None) -> Engine:
    dist = dist or DistContext()
    out_dir, t = Path(cfg.out_dir), cfg.train
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    resolve_precision(t.precision, resolve_device(t.device))
    resume_from = None
    if resume:
        resume_from = latest_checkpoint(out_dir / "checkpoints")
        if resume_from is None:
            raise ConfigError(f"--resume: no checkpoint under {out_dir / 'checkpoints'}")
    elif list_checkpoints(out_dir / "checkpoints"):
        raise ConfigError(f"{out_dir} already holds checkpoints; pass --resume to continue that run or choose another "
                          "out_dir")
    tokenizer, added = prepare_tokenizer(cfg)
    torch.manual_seed(t.seed)
    model, new_ids = prepare_model(cfg, tokenizer)
    if t.seq_len > model.config.max_seq_len:
        raise ConfigError(f"train.seq_len ({t.seq_len}) exceeds the model's max_seq_len ({model.config.max_seq_len})")
    train_records, val_records = load_records(cfg.data)
    samples, stats = encode_records(tokenizer, train_records, t.seq_len, cfg.data)
    val_samples, _ = encode_records(tokenizer, val_records, t.seq_len, replace(cfg.data, overlong="drop"))
    batches = SFTBatches(samples, t.seq_len, t.batch_size, t.grad_accum, cfg.data.pack, t.seed, dist.rank,
                         dist.world_size)
    val = validation_batches(val_samples, t.seq_len, t.batch_size, cfg.data.pack, dist.rank,
                             dist.world_size) if val_samples else None
    if cfg.epochs is not None:
        t = cfg.train = replace(t, steps=max(1, math.ceil(cfg.epochs * batches.steps_per_epoch())))

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    report = {**to_dict(stats), "validation_samples": len(val_samples), "added_special_tokens": added,
              "new_token_ids": new_ids, "trainable_parameters": trainable, "total_parameters": total,
              "rows_per_epoch": batches.rows_per_epoch, "steps": t.steps,
              "epochs": round(t.steps / batches.steps_per_epoch(), 3)}
    run_config = to_dict(cfg)
    tokenizer_dir = out_dir / "tokenizer"
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(tokenizer_dir)
        write_text(out_dir / "config.yaml", yaml.safe_dump(run_config, sort_keys=False))
        write_text(out_dir / "data_report.json", json.dumps(report, indent=2) + "\n")
        print(f"lmstack finetune: {cfg.method}, {trainable:,} of {total:,} parameters train; data: {stats.report()}; "
              f"{t.steps} steps ({report['epochs']} epochs)" + (f", resuming from {resume_from}" if resume_from else ""),
              file=sys.stderr)
    files = {p.name: p for p in sorted(tokenizer_dir.iterdir())} if tokenizer_dir.is_dir() else {}
    store = WholeModel(extra_files=files) if cfg.method == "full" else \
        AdapterStore(base_model_name_or_path=str(Path(cfg.model).resolve()) if Path(cfg.model).is_dir() else cfg.model,
                     extra_files=files)
    # an adapter run computes no weight gradients for the frozen base: about 4 N FLOPs per token, not 6 N
    flops = model_cost(model.config, context=t.seq_len).training_flops_per_token * (1.0 if cfg.method == "full" else 2 / 3)
    make_optimizer = None
    if cfg.optimizer == "adamw8bit":
        from lmstack.train.optim8bit import build_adamw8bit
        make_optimizer = build_adamw8bit
    return Engine(model, sft_loss, batches, t, cfg.optim, cfg.schedule, out_dir=out_dir, val_batches=val, dist=dist,
                  resume_from=resume_from, store=store, run_config=run_config, flops_per_token=flops,
                  **({"make_optimizer": make_optimizer} if make_optimizer else {}))


def run(cfg: FinetuneConfig, resume: bool = False) -> TrainResult:
    dist = init_distributed(resolve_device(cfg.train.device).type)
    try:
        return build_engine(cfg, resume, dist).fit()
    finally:
        shutdown_distributed()


__all__ = ["FinetuneConfig", "build_engine", "load_records", "prepare_model", "prepare_tokenizer", "run"]
