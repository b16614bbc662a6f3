"""Typed configs and presets for the non-decoder architectures: the BERT-style encoder and the T5-style
encoder-decoder. (The decoder's ModelConfig lives in lmstack.config.) Families are presets: data, not classes.

Field names follow lmstack's ModelConfig where the meaning is the same (hidden_size, num_layers,
num_heads, intermediate_size, max_seq_len, norm_eps, dropout, init_std), the Hugging Face names otherwise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from lmstack.errors import ConfigError
from lmstack.schema import from_dict, to_dict

EncoderHead = Literal["mlm", "nsp", "classifier"]
PoolingMode = Literal["mean", "cls", "max", "mean_sqrt_len"]


@dataclass
class SentencePooling:
    """How hidden states become one sentence embedding (sentence-transformers' 1_Pooling + Normalize modules)."""

    mode: PoolingMode = "mean"  # mean / max over real tokens, the [CLS] state, or the sum / sqrt(length)
    normalize: bool = True  # unit L2 norm
    max_tokens: int | None = None  # truncate texts to this many tokens, specials included (max_seq_length)


@dataclass
class EncoderConfig:
    """A BERT-style bidirectional encoder: token + learned position + token-type embeddings, post-norm blocks,
    an optional pooler (tanh(dense(h_[CLS]))) and heads: masked LM, next-sentence prediction, classification."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_seq_len: int = 512  # learned positions
    type_vocab_size: int = 2  # segments (sentence A / B)
    mlp_kind: Literal["gelu", "gelu_tanh", "relu"] = "gelu"
    norm_eps: float = 1e-12
    dropout: float = 0.1  # embeddings and residual branches (hidden_dropout_prob)
    attention_dropout: float = 0.1  # attention probabilities (attention_probs_dropout_prob)
    init_std: float = 0.02
    pooler: bool = True
    heads: list[EncoderHead] = field(default_factory=list)
    num_labels: int = 2  # the classifier's outputs
    labels: list[str] | None = None  # the classifier's label names in id order (config.json's id2label)
    classifier_dropout: float | None = None  # None = dropout
    pad_token_id: int | None = 0
    pooling: SentencePooling | None = None  # sentence embeddings (lmstack.embed); None = mean, normalised
    family: Literal["bert"] = "bert"

    def __post_init__(self) -> None:
        if isinstance(self.pooling, dict):
            self.pooling = from_dict(SentencePooling, self.pooling, prefix="pooling.")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_seq_len",
                     "type_vocab_size", "num_labels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if "nsp" in self.heads and not self.pooler:
            raise ConfigError("heads: nsp reads the pooler's output; set pooler true")
        if self.labels is not None and len(self.labels) != self.num_labels:
            raise ConfigError(f"labels {self.labels} name {len(self.labels)} labels but num_labels is {self.num_labels}")
        if len(set(self.heads)) != len(self.heads):
            raise ConfigError(f"heads {self.heads} lists a head twice")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **changes: Any) -> EncoderConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class Seq2SeqConfig:
    """A T5-style encoder-decoder: shared token embeddings, relative position buckets (a learned bias per head,
    in each stack's first layer, shared by its layers), RMS-style norms without bias or mean, pre-norm blocks,
    unscaled dot-product attention, a ReLU or gated-GELU feed-forward, tied or separate output head."""

    vocab_size: int = 32128
    hidden_size: int = 512  # d_model
    head_dim: int = 64  # d_kv
    intermediate_size: int = 2048  # d_ff
    num_layers: int = 6  # encoder
    num_decoder_layers: int | None = None  # None = num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    mlp_kind: Literal["relu", "gated-gelu", "gelu", "gated-relu", "gated-silu"] = "relu"  # feed_forward_proj
    norm_eps: float = 1e-6
    dropout: float = 0.1
    init_std: float = 1.0  # T5's initializer_factor (scales its fan-in based init)
    tie_word_embeddings: bool = True  # the head is the shared embedding matrix
    scale_decoder_outputs: bool | None = None  # decoder output x d_model^-0.5 before the head; None = tied
    max_seq_len: int = 512  # longest input accepted per stack (relative positions have no hard limit)
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    family: Literal["t5"] = "t5"

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings
        for name in ("vocab_size", "hidden_size", "head_dim", "intermediate_size", "num_layers", "num_decoder_layers",
                     "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{name} {getattr(self, name)} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def eos_token_ids(self) -> list[int]:
        return [self.eos_token_id]

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **changes: Any) -> Seq2SeqConfig:
        return dataclasses.replace(self, **changes)


def _bert(hidden: int, layers: int, heads: int, **kw: Any) -> dict[str, Any]:
    return dict(hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=4 * hidden, **kw)


def _t5(d: int, ff: int, layers: int, heads: int, gated: bool, **kw: Any) -> dict[str, Any]:
    return dict(hidden_size=d, head_dim=64, intermediate_size=ff, num_layers=layers, num_heads=heads,
                mlp_kind="gated-gelu" if gated else "relu", tie_word_embeddings=not gated, **kw)


# Presets are data: a name -> the fields that differ from the config class's defaults.
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "bert-tiny": _bert(128, 2, 2),  # Turc et al.'s BERT-Tiny (bert_uncased_L-2_H-128_A-2)
    "bert-mini": _bert(256, 4, 4),
    "bert-small": _bert(512, 4, 8),
    "bert-base": _bert(768, 12, 12),
    "bert-large": _bert(1024, 24, 16),
    "minilm-l6": _bert(384, 6, 12, pooling=dict(mode="mean", normalize=True, max_tokens=256)),  # all-MiniLM-L6-v2
    "minilm-l12": _bert(384, 12, 12, pooling=dict(mode="mean", normalize=True, max_tokens=128)),
}
SEQ2SEQ_PRESETS: dict[str, dict[str, Any]] = {
    "t5-tiny": _t5(64, 128, 2, 4, gated=True, vocab_size=512, max_seq_len=256),
    "t5-small": _t5(512, 2048, 6, 8, gated=False),
    "t5-base": _t5(768, 3072, 12, 12, gated=False),
    "t5-v1_1-small": _t5(512, 1024, 8, 6, gated=True),
    "flan-t5-small": _t5(512, 1024, 8, 6, gated=True),
    "flan-t5-base": _t5(768, 2048, 12, 12, gated=True),
}


def architecture_preset(name: str, **overrides: Any) -> EncoderConfig | Seq2SeqConfig | None:
    """The EncoderConfig / Seq2SeqConfig of preset `name` with field overrides, or None if it is not one."""
    if name in ENCODER_PRESETS:
        return from_dict(EncoderConfig, {**ENCODER_PRESETS[name], **overrides})
    if name in SEQ2SEQ_PRESETS:
        return from_dict(Seq2SeqConfig, {**SEQ2SEQ_PRESETS[name], **overrides})
    return None


__all__ = ["ENCODER_PRESETS", "SEQ2SEQ_PRESETS", "EncoderConfig", "SentencePooling", "Seq2SeqConfig",
           "architecture_preset"]
