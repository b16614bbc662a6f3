"""Generation: greedy, sampling, beam search, speculative decoding and streaming over a static KV cache."""

from lmstack.generate.config import GenerationConfig
from lmstack.generate.generate import (Beam, GenerationOutput, GenerationRun, GenerationStats, StreamEvent, generate,
                                       stream)

__all__ = ["Beam", "GenerationConfig", "GenerationOutput", "GenerationRun", "GenerationStats", "StreamEvent",
           "generate", "stream"]
