"""A T5 decoder bound to encoded prompts, as a CausalLM: what lets lmstack.generate's decode session drive an
encoder-decoder with every strategy it has (greedy, sampling, beam search, stop strings, penalties, logprobs).

    BoundDecoder(seq2seq, prompts)      B encoder prompts (id lists)
    make_cache(R, S)                    the encoder runs once per prompt -> each decoder layer's cross-attention
                                        keys/values (R, H, S_enc, D), computed once; row r reads prompt r // (R/B)
                                        (R = B for sampling, B x K for beam search's K beams per prompt)
    hidden_states / forward             decoder tokens at their cache slots -> decoder states / logits

The session sees only the CausalLM members (lmstack.model.protocol). Its per-layer cache list holds the
decoder's self-attention caches, then the cross-attention keys/values and the encoder's padding mask as
caches of their own (a (R, 1, S_enc, 1) "cache" of 1 = token / 0 = padding), so the session's row views
(prefill) and row reorders (beam search) carry them along with the self-attention keys. The decoder's
prompt is `decoder_start_token_id` alone, at slot 0; the session's per-row slots are the decoder positions.

Shapes: B prompts, R cache rows, S decoder cache slots, S_enc encoder tokens, H heads, D head dim, d width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmstack.device import autocast, resolve_precision
from lmstack.errors import GenerationError
from lmstack.model.kv_cache import KVCache
from lmstack.model.seq2seq import Seq2Seq


def _cache_holding(k: torch.Tensor, v: torch.Tensor) -> KVCache:
    """A KVCache whose keys and values are these tensors (R, H, S, D)."""
    cache = KVCache(k.shape[0], k.shape[1], k.shape[2], k.shape[3], k.dtype, k.device)
    cache.k.copy_(k)
    cache.v.copy_(v)
    return cache


class BoundDecoder(nn.Module):
    """The decoder of `seq2seq`, conditioned on `prompts` (B id lists, the encoder's inputs)."""

    def __init__(self, seq2seq: Seq2Seq, prompts: Sequence[Sequence[int]]):
        super().__init__()
        if not prompts or any(not p for p in prompts):
            raise GenerationError("every encoder prompt needs at least one token")
        self.seq2seq = seq2seq
        self.config = seq2seq.config  # vocab_size, max_seq_len, eos_token_ids: what the session reads
        self.prompts = [list(p) for p in prompts]
        self._layers = len(seq2seq.decoder.block)
        self._caches: list[KVCache | None] = [None] * (2 * self._layers + 1)
        self.train(seq2seq.training)  # the session restores this mode on exit: it must be the model's own

    # ------------------------------------------------------------------------------ the caches
    @torch.no_grad()
    def make_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> list[KVCache]:
        """Self-attention caches of `max_len` slots for `batch_size` rows, then the cross-attention keys/values
        of each row's prompt and its padding mask. The encoder runs here, once per prompt."""
        B = len(self.prompts)
        if batch_size % B:
            raise GenerationError(f"{batch_size} decoder rows cannot be shared evenly among {B} prompts")
        weight = self.seq2seq.shared.weight
        dtype, device = dtype or weight.dtype, device or weight.device
        config = self.seq2seq.config
        S_enc = max(len(p) for p in self.prompts)
        ids = torch.full((B, S_enc), config.pad_token_id, dtype=torch.long)
        mask = torch.zeros(B, S_enc, dtype=torch.long)
        for row, prompt in enumerate(self.prompts):
            ids[row, :len(prompt)], mask[row, :len(prompt)] = torch.tensor(prompt), 1
        ids, mask = ids.to(weight.device), mask.to(weight.device)
        was_training = self.seq2seq.training  # the session allocates its cache before it sets eval mode
        self.seq2seq.eval()
        try:
            with autocast(weight.device, resolve_precision("auto", weight.device)):
                states = self.seq2seq.encode(ids, mask)  # (B, S_enc, d)
                cross = [block.layer[1].EncDecAttention.project_kv(states) for block in self.seq2seq.decoder.block]
        finally:
            self.seq2seq.train(was_training)
        repeat = batch_size // B  # row r belongs to prompt r // repeat

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(repeat, 0).to(device=device, dtype=dtype)

        caches = [KVCache(batch_size, config.num_heads, max_len, config.head_dim, dtype, device)
                  for _ in range(self._layers)]
        caches += [_cache_holding(rows(k), rows(v)) for k, v in cross]  # (R, H, S_enc, D) each
        token = rows(mask[:, None, :, None].float())  # (R, 1, S_enc, 1): 1 = token, 0 = padding
        return caches + [_cache_holding(token, token)]

    def kv_caches(self) -> list[KVCache | None]:
        return list(self._caches)

    def use_caches(self, caches: list[KVCache | None]) -> None:
        if len(caches) != 2 * self._layers + 1:
            raise GenerationError(f"a bound T5 decoder takes {2 * self._layers + 1} caches, got {len(caches)}")
        for i, block in enumerate(self.seq2seq.decoder.block):
            block.layer[0].SelfAttention.kv_cache = caches[i]
            block.layer[1].EncDecAttention.cross_kv = caches[self._layers + i]
        self._caches = list(caches)

    # ------------------------------------------------------------------------------ the model calls
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None,
                      cache_slots: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder tokens (R, T) written at cache_slots (T,) or (R, T) -> decoder states (R, T, d). Positions are
        the slots (T5's relative bias needs no others): position_ids, when given, must equal them."""
        mask_cache = self._caches[-1]
        if cache_slots is None or mask_cache is None:
            raise GenerationError("a bound T5 decoder only decodes: install its caches (make_cache, use_caches) "
                                  "and pass cache_slots")
        encoder_mask = mask_cache.k[:, 0, :, 0] > 0  # (R, S_enc)
        return self.seq2seq.decode(input_ids, None, encoder_mask, cache_slots=cache_slots)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.seq2seq.head(hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache_slots: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
        """Decoder tokens (R, T) at cache_slots -> logits (R, T, V). (Training calls the Seq2Seq itself.)"""
        if targets is not None:
            raise GenerationError("a bound T5 decoder is for generation; compute losses with the Seq2Seq model")
        return self.head(self.hidden_states(input_ids, attention_mask, position_ids, cache_slots))


__all__ = ["BoundDecoder"]
