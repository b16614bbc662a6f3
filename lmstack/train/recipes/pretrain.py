"""The pretraining recipe: PretrainConfig -> an Engine that trains a causal LM from scratch on token shards.

    engine = build_engine(cfg)          # or run(cfg) = init distributed + build_engine(cfg).fit()

Writes OUT/config.yaml (the resolved config), OUT/metrics.jsonl, OUT/loss.png and
OUT/checkpoints/step-N/ (Hugging Face model directories with optimizer and trainer state).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml
from torch import nn

from lmstack.atomic import make_output_dir, write_text
from lmstack.config import PRESETS, ModelConfig
from lmstack.data.loader import PretrainBatches, TokenStream, validation_batches
from lmstack.device import resolve_device
from lmstack.errors import ConfigError, DataError
from lmstack.model.protocol import unwrap
from lmstack.model.transformer import Transformer
from lmstack.schema import from_dict, read_json, to_dict
from lmstack.train.checkpoint import WholeModel, begin_run
from lmstack.train.config import PretrainConfig
from lmstack.train.distributed import DistContext, init_distributed, shutdown_distributed
from lmstack.train.engine import Engine, TrainResult
from lmstack.train.objectives import Loss, causal_lm_loss
from lmstack.train.objectives.moe import router_losses
from lmstack.train.qat import apply_qat, write_quantized

_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def build_model_config(model: dict, vocab_size: int, eos_token_id: int) -> ModelConfig:
    """The `model:` section -> ModelConfig: an optional `preset`, then explicit fields.

    vocab_size and eos_token_id default to the data's. When the vocabulary comes from the data, a
    preset's special-token ids (Llama 3's bos 128000, ...) belong to the preset's tokenizer, not to
    this data's, so they are dropped unless the section sets them.
    """
    fields = dict(model)
    name = fields.pop("preset", None)
    if name is not None and name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    merged = {**(PRESETS[name] if name else {}), **fields}
    if "vocab_size" not in fields:
        merged["vocab_size"] = vocab_size
        for key in _SPECIAL_IDS:
            if key not in fields:
                merged[key] = None
    if "eos_token_id" not in fields:
        merged["eos_token_id"] = eos_token_id
    if isinstance(merged["vocab_size"], int) and merged["vocab_size"] < vocab_size:
        raise ConfigError(f"model.vocab_size ({merged['vocab_size']}) is smaller than the data's vocab_size "
                          f"({vocab_size})")
    try:
        return from_dict(ModelConfig, merged, prefix="model.")
    except ConfigError as e:  # ModelConfig.validate's messages name the field without the section
        raise ConfigError(str(e) if "model." in str(e) else f"model: {e}") from None


def _tokenizer_files(data_dir: Path) -> dict[str, Path]:
    """The data's tokenizer files, copied into every checkpoint so it is a complete model directory."""
    directory = data_dir / "tokenizer"
    return {p.name: p for p in sorted(directory.iterdir()) if p.is_file()} if directory.is_dir() else {}


def objective(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Loss:
    """Pretraining's objective: next-token cross-entropy over every token of (inputs (B, T), targets (B, T)),
    plus a mixture of experts' router losses (load balancing, z-loss) when the model has experts."""
    loss = causal_lm_loss(model, *batch)
    return loss + router_losses(model, loss.count)


def build_parts(cfg: PretrainConfig, dist: DistContext | None = None
                ) -> tuple[Transformer, PretrainBatches, list[tuple[torch.Tensor, torch.Tensor]] | None]:
    """The initial model (seeded: the same weights on every rank and every run), the training batches and the
    fixed validation batches (None without a val split) that `cfg` describes."""
    dist = dist or DistContext()
    if not cfg.data.path:
        raise ConfigError("data.path is required: a directory written by `lmstack data prepare`")
    data_dir, t = Path(cfg.data.path), cfg.train
    train_stream = TokenStream(data_dir / "train")
    val_index = data_dir / "val" / "index.json"  # absent or empty (--val-fraction 0): train without evaluation
    has_val = val_index.exists() and read_json(val_index, DataError).get("num_tokens", 1) > 0
    val_stream = TokenStream(data_dir / "val") if has_val else None
    model_config = build_model_config(cfg.model, train_stream.info.vocab_size, train_stream.info.eos_token_id)
    if t.seq_len > model_config.max_seq_len:
        raise ConfigError(f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({model_config.max_seq_len})")
    torch.manual_seed(t.seed)
    model = Transformer(model_config)
    batches = PretrainBatches(train_stream, t.seq_len, t.batch_size, t.grad_accum, t.seed, dist.rank, dist.world_size)
    val = (validation_batches(val_stream, t.seq_len, t.batch_size, t.eval_windows, dist.rank, dist.world_size)
           if val_stream is not None else None)
    return model, batches, val


def build_engine(cfg: PretrainConfig, resume: bool = False, dist: DistContext | None = None) -> Engine:
    """The engine for `cfg` (under torchrun: this process's share); with `resume`, from OUT's latest checkpoint."""
    dist = dist or DistContext()
    out_dir, t = Path(cfg.out_dir), cfg.train
    resume_from = begin_run(t, out_dir, resume)

    objective_fn, flops_per_token = objective, None
    store: WholeModel = WholeModel(extra_files=_tokenizer_files(Path(cfg.data.path)))
    if cfg.objective == "clm":
        model, batches, val = build_parts(cfg, dist)
    else:  # masked LM / span corruption: an encoder or encoder-decoder (lmstack.train.recipes.denoising)
        if cfg.qat is not None:
            raise ConfigError(f"qat: trains a decoder's linears with fake quantization; objective {cfg.objective!r} "
                              "builds an encoder / encoder-decoder (use objective: clm, or drop qat:)")
        from lmstack.train.recipes.denoising import WholeOtherModel, build_denoising_parts
        parts = build_denoising_parts(cfg, dist)
        model, batches, val, objective_fn = parts.model, parts.batches, parts.val, parts.objective
        flops_per_token, store = parts.flops_per_token, WholeOtherModel(extra_files=store.extra_files)
    if cfg.qat is not None:  # fake-quantized linears train; OUT/quantized/ is written after the last step (run)
        apply_qat(model, cfg.qat)
    run_config = to_dict(cfg)
    if dist.is_main:
        make_output_dir(out_dir)
        write_text(out_dir / "config.yaml", yaml.safe_dump({**run_config, "model": model.config.to_dict()},
                                                          sort_keys=False))
        print(f"lmstack pretrain: {model.num_parameters():,} parameters, {batches.tokens_per_step:,} tokens/step, "
              f"{t.steps} steps, world size {dist.world_size}"
              + (f", resuming from {resume_from}" if resume_from else ""), file=sys.stderr)
    return Engine(model, objective_fn, batches, t, cfg.optim, cfg.schedule, out_dir=out_dir, val_batches=val,
                  dist=dist, resume_from=resume_from, store=store, run_config=run_config,
                  flops_per_token=flops_per_token)


def run(cfg: PretrainConfig, resume: bool = False) -> TrainResult:
    """Pretrain per `cfg`: join the torchrun process group when there is one, build the engine, fit."""
    dist = init_distributed(resolve_device(cfg.train.device).type)
    try:
        engine = build_engine(cfg, resume, dist)
        result = engine.fit()
        if cfg.qat is not None and dist.is_main:
            out = Path(cfg.out_dir) / "quantized"
            write_quantized(unwrap(engine.model), cfg.qat, out, Path(cfg.data.path) / "tokenizer")
        return result
    finally:
        shutdown_distributed()
