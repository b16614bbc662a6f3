"""The model: one Transformer class configured by ModelConfig, and the CausalLM protocol it provides."""

from lmstack.model.kv_cache import KVCache
from lmstack.model.protocol import CausalLM, model_device, unwrap
from lmstack.model.transformer import Block, Transformer

__all__ = ["Block", "CausalLM", "KVCache", "Transformer", "model_device", "unwrap"]
