"""Generation: greedy, sampling, beam search, speculative decoding and streaming over a static KV cache.

Layout (each module imports only those above it): config, prompts, stopping, sampling, results; compiled,
session (the KV cache and the model calls); continuous (rows joining and leaving a running batch), run
(greedy / sampled), beam, speculative; api (`generate`, `stream`).
"""

from lmstack.generate.api import generate, stream
from lmstack.generate.config import GenerationConfig
from lmstack.generate.continuous import ContinuousBatch
from lmstack.generate.results import Beam, GenerationOutput, GenerationStats, StreamEvent
from lmstack.generate.run import GenerationRun
from lmstack.generate.session import DecodeSession

__all__ = ["Beam", "ContinuousBatch", "DecodeSession", "GenerationConfig", "GenerationOutput", "GenerationRun",
           "GenerationStats", "StreamEvent", "generate", "stream"]
