"""The model: one Transformer class configured by ModelConfig."""

from lmstack.model.kv_cache import KVCache
from lmstack.model.transformer import Block, Transformer

__all__ = ["Block", "KVCache", "Transformer"]
