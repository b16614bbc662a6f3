"""The fine-tuning recipe: FinetuneConfig -> an Engine that trains a pretrained model on instruction data.

    method: full    every weight trains; checkpoints are Hugging Face model directories
            lora    LoRA adapters (lmstack.adapters); checkpoints are peft adapter directories
            dora    the same with DoRA's magnitude
            qlora   LoRA on a base whose linears are stored as NF4 (4-bit NormalFloat, double-quantized scales)
            prompt, p_tuning, prefix, ia3, bottleneck   the other parameter-efficient methods (lmstack.adapters),
                    each configured by its own section (prompt_tuning:, p_tuning:, prefix_tuning:, ia3:, bottleneck:)

forgetting: replay of pretraining windows, EWC and L2-SP (lmstack.data.replay, lmstack.train.objectives.regularizers),
with any method.

Written under out_dir: config.yaml (resolved), data_report.json, tokenizer/ (with any chat markers the
base lacked), metrics.jsonl, loss.png and checkpoints/step-N/ (each loadable as it is: by transformers for
`full`, by peft / `lmstack chat --adapter` otherwise).
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
    train_new_rows,
)
from lmstack.data import instruct_tasks
from lmstack.data.loader import TokenStream
from lmstack.data.replay import ReplayBatches
from lmstack.data.sft import SFTBatches, SFTDataConfig, encode_records, read_records, validation_batches
from lmstack.device import resolve_device
from lmstack.errors import ConfigError
from lmstack.interop.hf import load_model
from lmstack.model.cost import model_cost
from lmstack.model.protocol import unwrap
from lmstack.schema import to_dict
from lmstack.tokenizer import Tokenizer
from lmstack.tokenizer.chat_template import TEMPLATE_SPECIAL_TOKENS, resolve_template
from lmstack.train.checkpoint import WholeModel, begin_run, write_run_record
from lmstack.train.config import OptimConfig, QATConfig, ScheduleConfig, TrainConfig
from lmstack.train.distributed import DistContext, init_distributed, shutdown_distributed
from lmstack.train.engine import Engine, TrainResult
from lmstack.train.objectives.regularizers import (
    estimate_fisher,
    ewc_penalty,
    fingerprint,
    l2sp_penalty,
    load_fisher,
    regularized,
    save_fisher,
)
from lmstack.train.objectives.sft import sft_loss

Method = Literal["full", "lora", "dora", "qlora", "prompt", "p_tuning", "prefix", "ia3", "bottleneck"]


@dataclass
class ForgettingConfig:
    """Mitigations of catastrophic forgetting, each off by default.

    replay_data: pretraining token shards (`lmstack data prepare`'s directory, or one split of it); replay_fraction
      of each micro-batch's rows are windows of it. ewc_lambda: EWC's lambda, with the diagonal Fisher in
      ewc_fisher (safetensors; estimated on ewc_windows windows of ewc_data, default replay_data, and written
      there when the file does not exist). l2sp_alpha: L2-SP's alpha (alpha/2 * ||theta - theta0||^2).
    """

    replay_data: str | None = None
    replay_fraction: float = 0.0
    ewc_lambda: float = 0.0
    ewc_fisher: str | None = None
    ewc_data: str | None = None
    ewc_windows: int = 64
    l2sp_alpha: float = 0.0


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
    forgetting: ForgettingConfig = field(default_factory=ForgettingConfig)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    epochs: float | None = None
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, weight_decay=0.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=10))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200, seq_len=512, eval_every=0))
    qat: QATConfig | None = None  # method full only: lmstack/train/qat.py (OUT/quantized/ after the last step)


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
    if cfg.method in others:
        others[cfg.method]()
        if new_ids:  # these methods train no rows: the new tokens' rows train beside them, or they stay equal
            train_new_rows(model, new_ids, head_only=cfg.method in ("prompt", "p_tuning"))
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
        n = cfg.max_samples or 2000  # add and sort have ~1,000 problems each: leave some unseen
        try:
            train = instruct_tasks.generate_tasks(n, cfg.seed)
            val = instruct_tasks.generate_tasks(max(64, n // 50), cfg.seed + 1, exclude=(r["prompt"] for r in train))
        except ValueError as e:
            raise ConfigError(f"data.max_samples={n}: {e}; ask for fewer samples") from None
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


# ------------------------------------------------------------------------------------------- forgetting
def token_stream(path: str, key: str) -> TokenStream:
    directory = Path(path)
    if not (directory / "index.json").is_file() and (directory / "train" / "index.json").is_file():
        directory = directory / "train"
    if not (directory / "index.json").is_file():
        raise ConfigError(f"forgetting.{key}: {path} holds no token shards (prepare them with `lmstack data prepare`)")
    return TokenStream(directory)


def ewc_fisher(cfg: FinetuneConfig, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """The base model's Fisher: read from forgetting.ewc_fisher (checked against the base's fingerprint), or
    estimated on the pretraining data and written there."""
    f = cfg.forgetting
    if not f.ewc_fisher:
        raise ConfigError("forgetting.ewc_lambda is set but forgetting.ewc_fisher (a .safetensors path) is not")
    base = load_model(cfg.model)
    base_print = fingerprint(base)
    if Path(f.ewc_fisher).is_file():
        return load_fisher(f.ewc_fisher, base_print)
    source = f.ewc_data or f.replay_data
    if not source:
        raise ConfigError(f"forgetting.ewc_fisher {f.ewc_fisher} does not exist; set forgetting.ewc_data (token "
                          "shards of the pretraining data) to estimate it")
    stream = token_stream(source, "ewc_data")
    T = min(seq_len, base.config.max_seq_len, len(stream) - 2)
    starts = np.random.default_rng([seed, 2]).integers(0, len(stream) - T, size=f.ewc_windows)
    inputs, targets = stream.windows(starts, T)
    fisher = estimate_fisher(base, zip(inputs, targets))
    save_fisher(f.ewc_fisher, fisher, base_print, f.ewc_windows)
    return fisher


def forgetting_objective(cfg: FinetuneConfig, model: nn.Module, fisher: dict[str, torch.Tensor] | None):
    """sft_loss plus the configured EWC / L2-SP terms (their anchors: the trained base weights as they start)."""
    f, objective = cfg.forgetting, sft_loss
    if not (f.ewc_lambda or f.l2sp_alpha):
        return objective
    if f.ewc_lambda and cfg.method in ("prompt", "p_tuning", "prefix", "bottleneck"):
        raise ConfigError(f"forgetting.ewc_lambda: method {cfg.method} changes no base weight, so EWC has nothing to "
                          "hold (use it with full, lora, dora, qlora or ia3)")
    # LoRA / DoRA / IA3 updates are measured on the weights they change (regularizers.base_weight_deltas); every
    # other trained tensor (full fine-tuning's weights, modules_to_save, an adapter's own) against its start
    lora_like = ("lora_A", "lora_B", "lora_magnitude_vector", "ia3_l")
    anchors = {n: p.detach().float().clone() for n, p in model.named_parameters()
               if p.requires_grad and not any(part in lora_like for part in n.split("."))}
    if f.ewc_lambda:
        objective = regularized(objective, lambda m: ewc_penalty(unwrap(m), fisher, anchors, f.ewc_lambda), "ewc")
    if f.l2sp_alpha:
        objective = regularized(objective, lambda m: l2sp_penalty(unwrap(m), anchors, f.l2sp_alpha), "l2sp")
    return objective


# ------------------------------------------------------------------------------------------- the engine
def build_engine(cfg: FinetuneConfig, resume: bool = False, dist: DistContext | None = None) -> Engine:
    dist = dist or DistContext()
    out_dir, t = Path(cfg.out_dir), cfg.train
    resume_from = begin_run(t, out_dir, resume)
    tokenizer, added = prepare_tokenizer(cfg)
    fisher = ewc_fisher(cfg, t.seq_len, t.seed) if cfg.forgetting.ewc_lambda else None
    torch.manual_seed(t.seed)
    model, new_ids = prepare_model(cfg, tokenizer)
    if cfg.qat is not None:  # quantization-aware training of the whole model (lmstack/train/qat.py)
        if cfg.method != "full":
            raise ConfigError(f"qat: trains the base weights, so it needs method: full (this config: {cfg.method})")
        from lmstack.train.qat import apply_qat
        apply_qat(model, cfg.qat)
    if t.seq_len > model.config.max_seq_len:
        raise ConfigError(f"train.seq_len ({t.seq_len}) exceeds the model's max_seq_len ({model.config.max_seq_len})")
    virtual = model.kv_prefix.num_virtual_tokens if getattr(model, "kv_prefix", None) is not None else 0
    if t.seq_len + virtual > model.config.max_seq_len:
        raise ConfigError(f"train.seq_len ({t.seq_len}) + the method's {virtual} virtual tokens exceed the model's "
                          f"max_seq_len ({model.config.max_seq_len}); set train.seq_len <= "
                          f"{model.config.max_seq_len - virtual}")
    train_records, val_records = load_records(cfg.data)
    samples, stats = encode_records(tokenizer, train_records, t.seq_len, cfg.data)
    val_samples, _ = encode_records(tokenizer, val_records, t.seq_len, replace(cfg.data, overlong="drop"))
    batches = SFTBatches(samples, t.seq_len, t.batch_size, t.grad_accum, cfg.data.pack, t.seed, dist.rank,
                         dist.world_size)
    val = validation_batches(val_samples, t.seq_len, t.batch_size, cfg.data.pack, dist.rank,
                             dist.world_size) if val_samples else None
    if cfg.epochs is not None:
        t = cfg.train = replace(t, steps=max(1, math.ceil(cfg.epochs * batches.steps_per_epoch())))
    if cfg.forgetting.replay_fraction:
        if not cfg.forgetting.replay_data:
            raise ConfigError("forgetting.replay_fraction is set but forgetting.replay_data (token shards) is not")
        batches = ReplayBatches(batches, token_stream(cfg.forgetting.replay_data, "replay_data"),
                                cfg.forgetting.replay_fraction, t.seed, dist.rank)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    report = {**to_dict(stats), "validation_samples": len(val_samples), "added_special_tokens": added,
              "new_token_ids": new_ids, "trainable_parameters": trainable, "total_parameters": total,
              "rows_per_epoch": batches.rows_per_epoch, "steps": t.steps,
              "epochs": round(t.steps / batches.steps_per_epoch(), 3)}
    run_config = to_dict(cfg)
    files = write_run_record(out_dir, tokenizer, run_config, report, main=dist.is_main)
    if dist.is_main:
        print(f"lmstack finetune: {cfg.method}, {trainable:,} of {total:,} parameters train; data: {stats.report()}; "
              f"{t.steps} steps ({report['epochs']} epochs)" + (f", resuming from {resume_from}" if resume_from else ""),
              file=sys.stderr)
    store = WholeModel(extra_files=files) if cfg.method == "full" else \
        AdapterStore(base_model_name_or_path=str(Path(cfg.model).resolve()) if Path(cfg.model).is_dir() else cfg.model,
                     extra_files=files)
    # an adapter run computes no weight gradients for the frozen base: about 4 N FLOPs per token, not 6 N
    flops = model_cost(model.config, context=t.seq_len).training_flops_per_token * (1.0 if cfg.method == "full" else 2 / 3)
    make_optimizer = None
    if cfg.optimizer == "adamw8bit":
        from lmstack.train.optim8bit import build_adamw8bit
        make_optimizer = build_adamw8bit
    return Engine(model, forgetting_objective(cfg, model, fisher), batches, t, cfg.optim, cfg.schedule, out_dir=out_dir, val_batches=val, dist=dist,
                  resume_from=resume_from, store=store, run_config=run_config, flops_per_token=flops,
                  **({"make_optimizer": make_optimizer} if make_optimizer else {}))


def run(cfg: FinetuneConfig, resume: bool = False) -> TrainResult:
    dist = init_distributed(resolve_device(cfg.train.device).type)
    try:
        engine = build_engine(cfg, resume, dist)
        result = engine.fit()
        if cfg.qat is not None and dist.is_main:
            from lmstack.train.qat import write_quantized
            out = Path(cfg.out_dir) / "quantized"
            write_quantized(unwrap(engine.model), cfg.qat, out, Path(cfg.out_dir) / "tokenizer")
        return result
    finally:
        shutdown_distributed()


__all__ = ["FinetuneConfig", "ForgettingConfig", "build_engine", "load_records", "prepare_model", "prepare_tokenizer", "run"]
