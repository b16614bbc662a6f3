"""GenerationConfig: every decoding option in one typed dataclass, validated with one clear message per mistake.

The same dataclass serves the Python API (`lmstack.generate(..., temperature=0.7)`), the CLI
(`--temperature 0.7`, or a YAML file through `lmstack.schema`) and, later, the server.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from lmstack.errors import ConfigError
from lmstack.schema import from_dict


@dataclass
class GenerationConfig:
    """Decoding options. `temperature == 0` is greedy decoding; any other temperature samples.

    Sampling filters apply in transformers' order: repetition penalty, presence/frequency penalties,
    temperature, top-k, top-p, min-p.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 samples from softmax(logits / temperature)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p; 1 = off
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely token's probability; 0 = off
    repetition_penalty: float = 1.0  # transformers/CTRL semantics over prompt + generated tokens; 1 = off
    presence_penalty: float = 0.0  # OpenAI semantics: subtract once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI semantics: subtract per occurrence in the generated tokens
    seed: int | None = None  # seeds a private torch.Generator: same seed, same samples
    eos_token_ids: list[int] | None = None  # None = the tokenizer's / model config's EOS ids
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    stop: list[str] = field(default_factory=list)  # stop strings, matched on the decoded text (needs a tokenizer)
    logprobs: bool = False  # return the log-probability of each generated token (under the raw model)
    top_logprobs: int = 0  # also return the n most likely alternatives at each step
    num_beams: int = 1  # > 1 = beam search
    length_penalty: float = 1.0  # beam score = sum of log-probs / generated_length ** length_penalty
    early_stopping: bool | Literal["never"] = False  # transformers' beam-search stopping rule
    num_return_sequences: int = 1  # n-best beams returned per prompt (<= num_beams)
    num_draft_tokens: int = 4  # speculative decoding: tokens the draft model proposes per round
    truncate_prompt: bool = False  # keep a too-long prompt's last tokens instead of raising
    add_special_tokens: bool = True  # encode text prompts as `tok(text)` does (e.g. with BOS); CLI --no-special-tokens
    compile: bool = False  # torch.compile the decode step (worth it for long generations)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the option for every out-of-range value."""
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.top_logprobs < 0:
            raise ConfigError(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be >= 1, got {self.num_beams}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise ConfigError(f"num_return_sequences must be between 1 and num_beams ({self.num_beams}), "
                              f"got {self.num_return_sequences}")
        if self.num_draft_tokens < 1:
            raise ConfigError(f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ConfigError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if self.eos_token_ids is not None and any(i < 0 for i in self.eos_token_ids):
            raise ConfigError(f"eos_token_ids must be non-negative token ids, got {self.eos_token_ids}")
        if self.num_beams > 1 and self.do_sample:
            raise ConfigError("beam search (num_beams > 1) is deterministic: leave temperature at 0 "
                              f"(got temperature={self.temperature})")

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def replace(self, **changes: Any) -> "GenerationConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationConfig":
        """Build from a mapping; an unknown key or a wrong type fails with the key's name."""
        return from_dict(cls, data)


def resolve_config(config: GenerationConfig | None, options: dict[str, Any]) -> GenerationConfig:
    """A config plus keyword overrides -> a validated GenerationConfig (unknown option names are errors)."""
    base = dataclasses.asdict(config) if config is not None else {}
    return from_dict(GenerationConfig, {**base, **options})
