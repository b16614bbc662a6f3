"""Pretraining objectives other than next-token prediction, for `lmstack pretrain` with `objective:`

    mlm        BERT masked-LM: an Encoder with the MLM head (lmstack.data.mlm, objectives.mlm)
    mlm+nsp    ... plus next-sentence prediction (pooler + NSP head)
    span       T5 span corruption: a Seq2Seq (lmstack.data.span, objectives.span)

The `model:` section holds EncoderConfig / Seq2SeqConfig fields (optionally `preset:` one of their
presets); vocab_size and the special ids default to the data tokenizer's. The rest of the run (engine,
checkpoints, resume, DDP) is the pretraining recipe's.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.data.loader import TokenStream
from lmstack.data.mlm import MaskedLMBatches, load_data_tokenizer, special_ids
from lmstack.data.span import SpanCorruptionBatches
from lmstack.errors import ConfigError
from lmstack.interop.hf import load_model, write_weights
from lmstack.interop.safetensors_io import assign
from lmstack.model.configs import ENCODER_PRESETS, SEQ2SEQ_PRESETS, EncoderConfig, Seq2SeqConfig
from lmstack.model.encoder import Encoder
from lmstack.model.seq2seq import Seq2Seq
from lmstack.schema import from_dict
from lmstack.train.checkpoint import WholeModel
from lmstack.train.config import PretrainConfig
from lmstack.train.distributed import DistContext
from lmstack.train.objectives.loss import Loss
from lmstack.train.objectives.mlm import mlm_loss
from lmstack.train.objectives.span import span_corruption_loss


@dataclass
class DenoisingParts:
    model: nn.Module
    batches: MaskedLMBatches | SpanCorruptionBatches
    val: list[dict[str, torch.Tensor]] | None
    objective: Callable[[nn.Module, Any], Loss]
    flops_per_token: float


@dataclass
class WholeOtherModel(WholeModel):
    """WholeModel for an Encoder / Seq2Seq: the directory is read back through lmstack.load_model."""

    def write(self, model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
        with torch.device("meta"):
            holder = type(model)(model.config)
        assign(holder, state)  # keeps the tied head tied, so it is written once
        write_weights(holder, directory, dtype=torch.float32)
        for name, source in self.extra_files.items():
            shutil.copyfile(source, directory / name)

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        return load_model(directory).state_dict()


def _config(section: dict[str, Any], cls: type, presets: dict[str, dict], defaults: dict[str, Any]):
    fields = dict(section)
    name = fields.pop("preset", None)
    if name is not None and name not in presets:
        raise ConfigError(f"model.preset: unknown preset {name!r} for this objective (known: {', '.join(sorted(presets))})")
    return from_dict(cls, {**(presets[name] if name else {}), **defaults, **fields}, prefix="model.")


def build_denoising_parts(cfg: PretrainConfig, dist: DistContext) -> DenoisingParts:
    """The model, batches, validation batches and objective for cfg.objective (mlm, mlm+nsp, span)."""
    if not cfg.data.path:
        raise ConfigError("data.path is required: a directory written by `lmstack data prepare`")
    data_dir, t = Path(cfg.data.path), cfg.train
    tokenizer = load_data_tokenizer(data_dir)
    train = TokenStream(data_dir / "train")
    val_stream = TokenStream(data_dir / "val") if (data_dir / "val" / "index.json").exists() else None
    common = dict(seq_len=t.seq_len, batch_size=t.batch_size, grad_accum=t.grad_accum, seed=t.seed, rank=dist.rank,
                  world_size=dist.world_size)
    if cfg.objective in ("mlm", "mlm+nsp"):
        nsp = cfg.objective == "mlm+nsp"
        pad = special_ids(tokenizer, str(data_dir / "tokenizer")).pad
        config = _config(cfg.model, EncoderConfig, ENCODER_PRESETS,
                         dict(vocab_size=tokenizer.vocab_size, pad_token_id=pad, heads=["mlm", "nsp"] if nsp else ["mlm"],
                              pooler=nsp))
        if "mlm" not in config.heads or nsp != ("nsp" in config.heads):
            raise ConfigError(f"model.heads {config.heads} do not fit objective {cfg.objective!r}")
        make = lambda stream, **kw: MaskedLMBatches(stream, tokenizer, nsp=nsp, masking=cfg.masking, **kw)  # noqa: E731
        model_cls, objective, needed = Encoder, mlm_loss, tokenizer.vocab_size
    else:
        batches_probe = SpanCorruptionBatches(train, tokenizer, t.seq_len, 1, spans=cfg.spans)
        pad = batches_probe.pad
        config = _config(cfg.model, Seq2SeqConfig, SEQ2SEQ_PRESETS,
                         dict(vocab_size=batches_probe.vocab_size, pad_token_id=pad, decoder_start_token_id=pad,
                              eos_token_id=train.info.eos_token_id))
        make = lambda stream, **kw: SpanCorruptionBatches(stream, tokenizer, spans=cfg.spans, **kw)  # noqa: E731
        model_cls, objective, needed = Seq2Seq, span_corruption_loss, batches_probe.vocab_size
    if config.vocab_size < needed:
        raise ConfigError(f"model.vocab_size ({config.vocab_size}) is smaller than the data needs ({needed})")
    if t.seq_len > config.max_seq_len:
        raise ConfigError(f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({config.max_seq_len})")
    torch.manual_seed(t.seed)
    model = model_cls(config)
    batches = make(train, **common)
    val = None
    if val_stream is not None:
        share = max(1, t.eval_windows // dist.world_size)
        val_source = make(val_stream, **{**common, "seed": t.seed + 1})
        val = val_source.validation(share, t.batch_size, dist.rank)
    flops = 6 * model.num_parameters(exclude_embeddings=True) + 6 * config.vocab_size * config.hidden_size
    return DenoisingParts(model, batches, val, objective, float(flops))
