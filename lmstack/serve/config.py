"""ServeConfig: what `lmstack serve` is told (the dataclass is the schema: flags and YAML map onto it)."""

from __future__ import annotations

from dataclasses import dataclass

from lmstack.errors import ConfigError


@dataclass
class ServeConfig:
    model: str = ""  # model directory
    adapter: str | None = None  # adapter directory applied to the model (when this build's load_model takes one)
    model_name: str | None = None  # the id clients send as "model"; default: the directory's name
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* requires `Authorization: Bearer KEY`
    device: str | None = None  # cpu, cuda, ... (default cpu)
    max_batch: int = 8  # KV pool rows: requests (choices) decoded together
    max_len: int | None = None  # KV slots per row = the longest prompt + completion; default: the model's context
    max_queue: int = 64  # requests that may wait for a row; past that, 429
    prefix_cache: int = 4  # cached shared prefixes (system prompts); 0 = off
    compile: bool = False  # torch.compile the decode step
    batch_wait_ms: float = 2.0  # a request that finds the pool idle waits this long for others arriving with it
    engine: str = "thread"  # the scheduler on a thread of the web process, or "process": in a process of its own

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.max_len is not None and self.max_len < 2:
            raise ConfigError(f"--max-len must be >= 2 (a prompt token and a new one), got {self.max_len}")
        if self.max_queue < 0:
            raise ConfigError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.prefix_cache < 0:
            raise ConfigError(f"--prefix-cache must be >= 0 (0 = off), got {self.prefix_cache}")
        if self.batch_wait_ms < 0:
            raise ConfigError(f"--batch-wait-ms must be >= 0 (0 = off), got {self.batch_wait_ms}")
        if self.engine not in ("process", "thread"):
            raise ConfigError(f"--engine must be 'process' or 'thread', got {self.engine!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
