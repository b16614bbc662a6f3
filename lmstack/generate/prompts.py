"""Prompt intake: text or ids in, validated id lists out.

Text is encoded as transformers encodes it by default (`tok(text)`: with the tokenizer's special tokens,
e.g. BOS for Llama-style tokenizers), unless `add_special_tokens=False`. Text rendered from a chat
template is encoded without them by its callers: the template writes them itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from lmstack.errors import ConfigError, GenerationError
from lmstack.generate.config import GenerationConfig

PromptInput = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor


class TokenizerLike(Protocol):
    """What generation needs from a tokenizer (lmstack.tokenizer.Tokenizer provides it)."""

    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


def encode_prompts(prompts: PromptInput, tokenizer: TokenizerLike | None,
                   add_special_tokens: bool = True) -> list[list[int]]:
    """Normalise every accepted prompt form to a list of id lists.

    Accepted: a string or list of strings (needs a tokenizer; encoded with the tokenizer's special tokens
    unless `add_special_tokens` is False), a list of ids, a list of id lists, or an id tensor (T,) / (B, T).
    """
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() not in (1, 2) or prompts.dtype.is_floating_point:
            raise ConfigError(f"prompt tensor must be integer ids of shape (T,) or (B, T), got {tuple(prompts.shape)} "
                              f"{prompts.dtype}")
        rows = prompts[None] if prompts.dim() == 1 else prompts  # (B, T)
        return [row.tolist() for row in rows]
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ConfigError("no prompts given")
    if all(isinstance(p, int) for p in prompts):
        return [[int(p) for p in prompts]]
    out: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ConfigError(f"prompt {i} is text but no tokenizer was given; pass a tokenizer or token ids")
            out.append(list(tokenizer.encode(prompt, add_special_tokens=add_special_tokens)))
        elif isinstance(prompt, torch.Tensor):
            out.append(prompt.reshape(-1).tolist())
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            out.append([int(t) for t in prompt])
        else:
            raise ConfigError(f"prompt {i}: expected a string or a list of token ids, got {_describe(prompt)}")
    return out


def prepare_prompts(model: Any, tokenizer: TokenizerLike | None, prompts: PromptInput,
                    config: GenerationConfig) -> list[list[int]]:
    """Encode the prompts and check them against `model` (a CausalLM): its vocabulary and context."""
    if config.stop and tokenizer is None:
        raise GenerationError("stop strings are matched on decoded text: pass a tokenizer (or use eos_token_ids)")
    ids = encode_prompts(prompts, tokenizer, config.add_special_tokens)
    return fit_to_context(ids, model.config.vocab_size, model.config.max_seq_len, config.max_new_tokens,
                          config.truncate_prompt)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def fit_to_context(prompts: list[list[int]], vocab_size: int, context: int, max_new_tokens: int,
                   truncate: bool) -> list[list[int]]:
    """Check each prompt against the vocabulary and the model's context; return the prompts to use.

    A prompt that leaves no room for max_new_tokens is an error, or, with `truncate`, keeps its last
    context - max_new_tokens tokens (at least one). Generation that would run past the context is cut
    short later (finish reason "length").
    """
    fitted = []
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ConfigError(f"prompt {i} is empty: give at least one token")
        bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ConfigError(f"prompt {i} holds token id {bad}, outside the model's vocabulary (size {vocab_size})")
        if len(prompt) + max_new_tokens > context:
            keep = max(context - max_new_tokens, 1)
            if truncate:
                prompt = prompt[-keep:]
            elif len(prompt) >= context:
                raise ConfigError(f"prompt {i} has {len(prompt)} tokens but the model's context is {context} "
                                  "tokens: shorten it, or truncate it (truncate_prompt=True, "
                                  "--truncate-prompt) to keep its last tokens")
        fitted.append(prompt)
    return fitted


def right_pad(prompts: Sequence[Sequence[int]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """B prompts -> ids (B, P) padded on the right to the longest with id 0, and lengths (B,).

    Each row's prompt sits in cache slots [0, len): no padding mask is needed, because a query at slot s
    attends only to slots <= s, and a row's pads (and their keys) come after its last real token.
    """
    P = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), P), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), lengths.to(device)
