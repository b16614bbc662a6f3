"""Prompt intake: text or ids in, validated and left-padded (B, P) ids + mask out.

Left padding puts every row's last prompt token in the same slot, so one decode step serves the whole
batch; the attention mask hides the pads and positions are counted from the first real token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lmstack.errors import ConfigError

PromptInput = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor


class TokenizerLike(Protocol):
    """What generation needs from a tokenizer (lmstack.tokenizer.Tokenizer provides it)."""

    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


@dataclass
class PromptBatch:
    """B prompts, left-padded to the longest (P tokens)."""

    ids: torch.Tensor  # (B, P) token ids, pads on the left
    mask: torch.Tensor  # (B, P) 1 on real tokens, 0 on pads
    lengths: torch.Tensor  # (B,) real tokens per row
    prompts: list[list[int]]  # the unpadded prompts (after any truncation)

    @property
    def batch_size(self) -> int:
        return self.ids.shape[0]

    @property
    def padded_len(self) -> int:
        return self.ids.shape[1]


def encode_prompts(prompts: PromptInput, tokenizer: TokenizerLike | None) -> list[list[int]]:
    """Normalise every accepted prompt form to a list of id lists.

    Accepted: a string or list of strings (needs a tokenizer), a list of ids, a list of id lists, or an
    id tensor (T,) / (B, T).
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
            out.append(list(tokenizer.encode(prompt, add_special_tokens=False)))
        elif isinstance(prompt, torch.Tensor):
            out.append(prompt.reshape(-1).tolist())
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            out.append([int(t) for t in prompt])
        else:
            raise ConfigError(f"prompt {i}: expected a string or a list of token ids, got {_describe(prompt)}")
    return out


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


def left_pad(prompts: Sequence[list[int]], pad_id: int, device: torch.device | str) -> PromptBatch:
    """Left-pad B prompts to the longest: ids and mask (B, P)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, P - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, P - len(prompt):] = 1
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return PromptBatch(ids.to(device), mask.to(device), lengths.to(device), [list(p) for p in prompts])
