"""Sentence embeddings from an encoder: `embed(model, tokenizer, texts)`, as sentence-transformers computes them.

Texts are encoded with the tokenizer's special tokens ([CLS] ... [SEP]), truncated to the pooling
config's `max_tokens` (the last token, [SEP], kept), right-padded into batches, run through the encoder,
pooled over the real tokens (mean by default; the model directory's 1_Pooling/config.json decides) and
L2-normalised when the directory has a Normalize module. Padding never changes a text's embedding: its
keys are masked and pooling skips it, so a batch gives each text's embedding alone (to float rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from lmstack.errors import ConfigError
from lmstack.model.configs import SentencePooling
from lmstack.model.encoder import Encoder, pool
from lmstack.model.protocol import model_device


class TokenizerLike(Protocol):
    pad_token_id: int | None

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]: ...


@torch.no_grad()
def embed(model: Encoder, tokenizer: TokenizerLike, texts: str | Sequence[str], batch_size: int = 32
          ) -> torch.Tensor:
    """texts (N) -> embeddings (N, d) in fp32 on the CPU; one text -> (d,)."""
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    if not isinstance(model, Encoder):
        raise ConfigError(f"embed needs an encoder model (e.g. a BERT / MiniLM directory), got {type(model).__name__}")
    if any(not isinstance(t, str) for t in texts):
        raise TypeError("embed takes a string or a list of strings")
    pooling = model.config.pooling or SentencePooling()
    limit = min(pooling.max_tokens or model.config.max_seq_len, model.config.max_seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training, device = model.training, model_device(model)
    model.eval()
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            ids = [_truncate(x, limit) for x in tokenizer.encode_batch(texts[start:start + batch_size],
                                                                          add_special_tokens=True)]
            T = max(len(x) for x in ids)
            batch = torch.full((len(ids), T), pad, dtype=torch.long)
            mask = torch.zeros(len(ids), T, dtype=torch.long)
            for row, x in enumerate(ids):
                batch[row, :len(x)] = torch.tensor(x)
                mask[row, :len(x)] = 1
            batch, mask = batch.to(device), mask.to(device)
            vectors = pool(model.hidden_states(batch, mask).float(), mask, pooling.mode)  # (b, d)
            if pooling.normalize:
                vectors = F.normalize(vectors, p=2, dim=-1)
            out.append(vectors.cpu())
    finally:
        model.train(was_training)
    result = torch.cat(out) if out else torch.empty(0, model.config.hidden_size)
    return result[0] if single else result


def _truncate(ids: list[int], limit: int) -> list[int]:
    """Keep the first limit - 1 tokens and the closing special token, as transformers' truncation does."""
    return ids if len(ids) <= limit else ids[:limit - 1] + ids[-1:]


__all__ = ["embed"]
