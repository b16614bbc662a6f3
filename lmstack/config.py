"""ModelConfig: one typed description of every supported decoder-only transformer, plus presets.

Model families (Llama, Mistral, Qwen2, GPT-2, SmolLM) are presets (data), not subclasses. The
`family` field only says which Hugging Face architecture to write on export.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from lmstack.errors import ConfigError
from lmstack.schema import from_dict, to_dict

MlpKind = Literal["swiglu", "gelu", "gelu_tanh", "relu"]
NormKind = Literal["rmsnorm", "layernorm"]
PositionKind = Literal["rope", "learned", "sinusoidal"]
Family = Literal["llama", "mistral", "qwen2", "gpt2"]


@dataclass
class RopeScaling:
    """RoPE frequency scaling for context extension. `kind="none"` keeps the plain frequencies."""

    kind: Literal["none", "linear", "llama3"] = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass
class ModelConfig:
    """Shape and behaviour of a decoder-only transformer. Field names follow Hugging Face where one exists."""

    vocab_size: int = 32000
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int | None = None  # None = num_heads (MHA); 1 = MQA; otherwise GQA
    head_dim: int | None = None  # None = hidden_size // num_heads
    intermediate_size: int = 1376
    mlp_kind: MlpKind = "swiglu"
    norm_kind: NormKind = "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = False  # LayerNorm only
    position_kind: PositionKind = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_seq_len: int = 2048
    sliding_window: int | None = None  # attend to at most this many previous tokens (itself included)
    dropout: float = 0.0  # embedding, attention-probability and residual dropout
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    family: Family = "llama"

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # ModelConfig(rope_scaling={...}) from Python, like from YAML
            self.rope_scaling = from_dict(RopeScaling, self.rope_scaling, prefix="rope_scaling.")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.num_heads <= 0 or self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}) "
                    "unless head_dim is set")
            self.head_dim = self.hidden_size // self.num_heads
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field for any inconsistent value."""
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads "
                              f"({self.num_kv_heads})")
        if self.position_kind == "rope" and self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even for rope")
        if self.position_kind == "sinusoidal" and self.hidden_size % 2:
            raise ConfigError(f"hidden_size ({self.hidden_size}) must be even for sinusoidal positions")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or null, got {self.sliding_window}")
        if self.rope_scaling.kind != "none" and self.rope_scaling.factor <= 0:
            raise ConfigError(f"rope_scaling.factor must be positive, got {self.rope_scaling.factor}")
        if self.norm_bias and self.norm_kind == "rmsnorm":
            raise ConfigError("norm_bias applies to layernorm only; RMSNorm has no bias")
        # A special id outside the embedding table fails late and far away (an index error when bos is
        # prepended, an eos that can never be sampled): refuse it here, where the field can be named.
        for name, ids in (("bos_token_id", [self.bos_token_id]), ("eos_token_id", self.eos_token_ids),
                          ("pad_token_id", [self.pad_token_id])):
            for token_id in ids:
                if token_id is not None and not 0 <= token_id < self.vocab_size:
                    raise ConfigError(f"{name} {token_id} is outside the vocabulary [0, {self.vocab_size}) of "
                                      f"vocab_size {self.vocab_size}: set {name} to an id below {self.vocab_size} "
                                      "(the tokenizer's) or to null")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return from_dict(cls, data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _llama(hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int = 32000, **kw: Any) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                intermediate_size=inter, **kw)


def _gpt2(hidden: int, layers: int, heads: int) -> dict:
    return dict(vocab_size=50257, hidden_size=hidden, num_layers=layers, num_heads=heads,
                intermediate_size=4 * hidden, mlp_kind="gelu_tanh", norm_kind="layernorm", norm_bias=True,
                position_kind="learned", qkv_bias=True, out_bias=True, mlp_bias=True, tie_word_embeddings=True,
                max_seq_len=1024, bos_token_id=50256, eos_token_id=50256, family="gpt2")


# Presets are data: a name -> the ModelConfig fields that differ from the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-tiny": _llama(64, 2, 4, 2, 176, vocab=512, max_seq_len=256, tie_word_embeddings=True),
    "llama-30m": _llama(384, 6, 6, 2, 1024, vocab=8192, max_seq_len=1024, tie_word_embeddings=True),
    "llama-125m": _llama(768, 12, 12, 4, 2048, vocab=32000, max_seq_len=2048, tie_word_embeddings=True),
    "llama-1b": _llama(2048, 16, 32, 8, 8192, vocab=128256, max_seq_len=131072, norm_eps=1e-5,
                       rope_theta=500000.0, tie_word_embeddings=True, head_dim=64,
                       rope_scaling=dict(kind="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=8192),
                       bos_token_id=128000, eos_token_id=128001),
    "llama-8b": _llama(4096, 32, 32, 8, 14336, vocab=128256, max_seq_len=131072, rope_theta=500000.0,
                       rope_scaling=dict(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=8192),
                       bos_token_id=128000, eos_token_id=128001),
    "mistral-7b": _llama(4096, 32, 32, 8, 14336, vocab=32000, max_seq_len=32768, sliding_window=4096,
                         bos_token_id=1, eos_token_id=2, family="mistral"),
    "qwen2-0.5b": _llama(896, 24, 14, 2, 4864, vocab=151936, max_seq_len=32768, norm_eps=1e-6,
                         rope_theta=1000000.0, qkv_bias=True, tie_word_embeddings=True,
                         bos_token_id=151643, eos_token_id=151643, family="qwen2"),
    "smollm-135m": _llama(576, 30, 9, 3, 1536, vocab=49152, max_seq_len=2048, rope_theta=10000.0,
                          tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
    "gpt2": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
}
PRESETS["gpt2-124m"] = PRESETS["gpt2"]
PRESETS["gpt2-355m"] = PRESETS["gpt2-medium"]
PRESETS["gpt2-774m"] = PRESETS["gpt2-large"]
PRESETS["gpt2-1.5b"] = PRESETS["gpt2-xl"]


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig for preset `name`, with field overrides applied (e.g. vocab_size=...)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return from_dict(ModelConfig, {**PRESETS[name], **overrides})
