"""`lmstack pretrain`: train a causal language model from scratch on prepared token shards.

    lmstack pretrain --config configs/tiny-python-docs.yaml [--train.steps=100 --data.path=DIR ...] [--resume]
    torchrun --nproc_per_node=2 -m lmstack pretrain --config ... [--train.distributed=fsdp]

Writes OUT/config.yaml (the resolved config), OUT/metrics.jsonl, OUT/loss.png and
OUT/checkpoints/step-N/ (Hugging Face model directories with optimizer and trainer state).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml

from lmstack.atomic import write_text
from lmstack.config import PRESETS, ModelConfig
from lmstack.data.loader import PretrainBatches, TokenStream, validation_batches
from lmstack.device import resolve_device, resolve_precision
from lmstack.errors import ConfigError
from lmstack.model.transformer import Transformer
from lmstack.schema import from_dict, to_dict
from lmstack.train.checkpoint import latest_checkpoint, list_checkpoints
from lmstack.train.config import PretrainConfig
from lmstack.train.distributed import init_distributed, shutdown_distributed
from lmstack.train.engine import Engine, TrainResult
from lmstack.train.objectives import causal_lm_loss


def build_model_config(model: dict, vocab_size: int, eos_token_id: int) -> ModelConfig:
    """The `model:` section -> ModelConfig: an optional `preset`, then explicit fields; vocab/eos default to the data's."""
    fields = dict(model)
    name = fields.pop("preset", None)
    if name is not None and name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    merged = {**(PRESETS[name] if name else {}), **fields}
    if "vocab_size" not in fields:
        merged["vocab_size"] = vocab_size
    if "eos_token_id" not in fields:
        merged["eos_token_id"] = eos_token_id
    config = from_dict(ModelConfig, merged, prefix="model.")
    if config.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size ({config.vocab_size}) is smaller than the data's vocab_size ({vocab_size})")
    return config


def _tokenizer_files(data_dir: Path) -> dict[str, Path]:
    """The data's tokenizer files, copied into every checkpoint so it is a complete model directory."""
    directory = data_dir / "tokenizer"
    return {p.name: p for p in sorted(directory.iterdir()) if p.is_file()} if directory.is_dir() else {}


def run(cfg: PretrainConfig, resume: bool = False) -> TrainResult:
    """Pretrain per `cfg` (under torchrun: this process's share). Returns the run's summary."""
    if not cfg.data.path:
        raise ConfigError("data.path is required: a directory written by `lmstack data prepare`")
    data_dir = Path(cfg.data.path)
    out_dir = Path(cfg.out_dir)
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    resolve_precision(cfg.train.precision, device)  # refuse bf16 on a CPU without it before anything is written
    dist = init_distributed(device.type)
    try:
        train_stream = TokenStream(data_dir / "train")
        val_stream = TokenStream(data_dir / "val") if (data_dir / "val" / "index.json").exists() else None
        info = train_stream.info
        model_config = build_model_config(cfg.model, info.vocab_size, info.eos_token_id)
        if cfg.train.seq_len > model_config.max_seq_len:
            raise ConfigError(f"train.seq_len ({cfg.train.seq_len}) exceeds model.max_seq_len ({model_config.max_seq_len})")

        resume_from = None
        if resume:
            resume_from = latest_checkpoint(out_dir / "checkpoints")
            if resume_from is None:
                raise ConfigError(f"--resume: no checkpoint under {out_dir / 'checkpoints'}")
        elif list_checkpoints(out_dir / "checkpoints"):
            raise ConfigError(f"{out_dir} already holds checkpoints; pass --resume to continue that run or choose "
                              "another out_dir")

        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every run
        model = Transformer(model_config)
        t = cfg.train
        batches = PretrainBatches(train_stream, t.seq_len, t.batch_size, t.grad_accum, t.seed, dist.rank, dist.world_size)
        val = (validation_batches(val_stream, t.seq_len, t.batch_size, t.eval_windows, dist.rank, dist.world_size)
               if val_stream is not None else None)
        run_config = to_dict(cfg)
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_text(out_dir / "config.yaml", yaml.safe_dump({**run_config, "model": model_config.to_dict()},
                                                              sort_keys=False))
            print(f"lmstack pretrain: {model.num_parameters():,} parameters, {batches.tokens_per_step:,} tokens/step, "
                  f"{t.steps} steps, world size {dist.world_size}"
                  + (f", resuming from {resume_from}" if resume_from else ""), file=sys.stderr)
        engine = Engine(model, lambda m, batch: causal_lm_loss(m, *batch), batches, t, cfg.optim, cfg.schedule,
                        out_dir=out_dir, val_batches=val, dist=dist, resume_from=resume_from,
                        extra_files=_tokenizer_files(data_dir), run_config=run_config)
        return engine.fit()
    finally:
        shutdown_distributed()
