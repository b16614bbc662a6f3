"""What an adapter trains besides low-rank updates: whole modules (`modules_to_save`) and single token rows
(`trainable_token_indices`), as peft defines them; and growing the vocabulary for new special tokens.

    ModulesToSave     a trained copy of a module beside the frozen original (peft's ModulesToSaveWrapper)
    TrainableTokens   rows of an embedding / the head replaced by trained values (peft's TrainableTokensLayer:
                      replaced, not added to, so the base's own init of those rows never matters)
    resize_vocab      add rows to the embedding and the head, initialised to the mean of the existing rows
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.model.linear import Linear


class ModulesToSave(nn.Module):
    """`modules_to_save` (trained) used in place of `original_module` (frozen), unless disabled."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module.requires_grad_(False)
        self.modules_to_save = copy.deepcopy(module).requires_grad_(True)
        self.enabled = True

    def forward(self, *args, **kwargs):
        return (self.modules_to_save if self.enabled else self.original_module)(*args, **kwargs)

    @property
    def weight(self) -> torch.Tensor:  # what code reading `.weight` of the wrapped module expects
        return (self.modules_to_save if self.enabled else self.original_module).weight


class TrainableTokens(nn.Module):
    """An embedding or a head whose rows `token_indices` come from `trainable_tokens_delta` (n, d).

    Wrapping a tied head and its embedding with the same delta keeps them tied, as peft does.
    """

    def __init__(self, base_layer: nn.Module, token_indices: list[int], delta: nn.Parameter | None = None):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.register_buffer("token_indices", torch.tensor(sorted(token_indices), dtype=torch.long,
                                                           device=base_layer.weight.device), persistent=False)
        if delta is None:  # start from the rows as they are (peft's init)
            delta = nn.Parameter(base_layer.weight.detach()[self.token_indices].clone())
        self.trainable_tokens_delta = delta
        self.enabled = True

    @property
    def weight(self) -> torch.Tensor:
        """The (num_rows, d) matrix in use: the base weight with the trained rows written in."""
        if not self.enabled:
            return self.base_layer.weight
        return self.base_layer.weight.index_copy(0, self.token_indices,
                                                 self.trainable_tokens_delta.to(self.base_layer.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base_layer, nn.Embedding):
            return F.embedding(x, self.weight, self.base_layer.padding_idx)
        return F.linear(x, self.weight, self.base_layer.bias)

    @torch.no_grad()
    def merged_layer(self) -> nn.Module:
        """The base layer with the trained rows written into its weight (in place)."""
        self.base_layer.weight.copy_(self.weight)
        return self.base_layer


@torch.no_grad()
def resize_vocab(model: nn.Module, new_size: int) -> int:
    """Grow the token embedding and the head to `new_size` rows; new rows start at the mean of the old ones
    (so a new token's logit starts near the average instead of at a random extreme). Returns the old size.

    A tied head stays tied (it is the embedding matrix). model.config.vocab_size follows.
    """
    embed = model.model.embed_tokens
    old = embed.num_embeddings
    if new_size <= old:
        return old
    grown = nn.Embedding(new_size, embed.embedding_dim, device=embed.weight.device, dtype=embed.weight.dtype)
    grown.weight[:old] = embed.weight
    grown.weight[old:] = embed.weight.mean(0, keepdim=True)
    grown.weight.requires_grad_(embed.weight.requires_grad)
    model.model.embed_tokens = grown
    if model.config.tie_word_embeddings:
        model.lm_head.weight = grown.weight
    else:
        head = model.lm_head
        new_head = Linear(head.in_features, new_size, bias=head.bias is not None, device=head.weight.device,
                          dtype=head.weight.dtype)
        new_head.weight[:old] = head.weight
        new_head.weight[old:] = head.weight.mean(0, keepdim=True)
        if head.bias is not None:
            new_head.bias[:old] = head.bias
            new_head.bias[old:] = head.bias.mean()
        new_head.requires_grad_(head.weight.requires_grad)
        model.lm_head = new_head
    model.config.vocab_size = new_size
    return old


__all__ = ["ModulesToSave", "TrainableTokens", "resize_vocab"]
