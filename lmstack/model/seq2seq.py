"""The T5-style encoder-decoder: translation, summarisation, span-corruption pretraining.

    shared embeddings -> encoder stack (bidirectional) -> encoder states (B, S, d)
    decoder stack: causal self-attention, cross-attention to the encoder states, feed-forward -> head

Both stacks are pre-norm with T5's RMS norm (a gain, no bias, no mean subtraction). Attention is
unscaled (T5 folds 1/sqrt(D) into its initialisation) and adds a learned bias per head indexed by the
bucketed relative position (key - query): half the buckets exact small offsets, half log-spaced up to
`relative_attention_max_distance`; the encoder's buckets are bidirectional, the decoder's causal. Each
stack's first layer holds the bias table, shared by its other layers; cross-attention has none.
The feed-forward is ReLU (T5 1.0) or gated GELU (T5 1.1 / Flan-T5). With a tied head the decoder output
is scaled by d^-0.5 first (`scale_decoder_outputs`).

Parameter names are transformers' T5ForConditionalGeneration names (`shared`, `encoder.block.N.layer.0.
SelfAttention.q`, `decoder.block.N.layer.1.EncDecAttention.k`, `layer.2.DenseReluDense.wi_0`, ...).

Decoding: lmstack.model.seq2seq_decoder binds the decoder to encoded prompts as a CausalLM (the encoder
runs once per prompt and every decoder layer's cross-attention keys/values are computed once), so
lmstack.generate's decode session drives it; each step is `decode(tokens, None, mask, cache_slots=...)`.

Shapes: B batch, S encoder tokens, T decoder tokens, H heads, D head dim, d width, F feed-forward, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmstack.errors import ConfigError
from lmstack.model.configs import Seq2SeqConfig
from lmstack.model.head_loss import linear_cross_entropy
from lmstack.model.kv_cache import KVCache
from lmstack.model.linear import Linear

# feed_forward_proj -> activation; transformers maps "gated-gelu" to the tanh approximation (gelu_new), "gelu" not
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gated-gelu": lambda x: F.gelu(x, approximate="tanh"),
                "gated-relu": F.relu, "gated-silu": F.silu}


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Mesh TensorFlow's bucketing of (key - query) offsets, as T5 defines it: (...) int -> (...) in
    [0, num_buckets)."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets  # keys after the query: upper half
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)  # a causal query only looks back
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class T5Attention(nn.Module):
    """Unscaled multi-head attention with an additive bias; self-attention (with a static cache in the decoder)
    or cross-attention (keys/values from the encoder states, computed once per prompt when decoding)."""

    def __init__(self, config: Seq2SeqConfig, has_relative_bias: bool, is_cross: bool = False):
        super().__init__()
        self.num_heads, self.head_dim, self.is_cross = config.num_heads, config.head_dim, is_cross
        inner = config.num_heads * config.head_dim
        self.q, self.k, self.v = (Linear(config.hidden_size, inner, bias=False) for _ in range(3))
        self.o = Linear(inner, config.hidden_size, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.dropout = config.dropout
        self.kv_cache: KVCache | None = None  # decoder self-attention while decoding
        self.cross_kv: KVCache | None = None  # cross-attention while decoding: the encoder's keys/values

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def project_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states (B, S, d) -> keys, values (B, H, S, D)."""
        return self._heads(self.k(states)), self._heads(self.v(states))

    def forward(self, x: torch.Tensor, bias: torch.Tensor, kv_states: torch.Tensor | None = None,
                cache_slots: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d). bias: (B|1, H|1, T, S) float, the position bias plus -inf where masked.

        kv_states (B, S, d): the encoder states for cross-attention (None: self-attention). While decoding,
        self-attention writes its keys/values at `cache_slots` and reads the whole cache; cross-attention reads
        the keys/values `encode_for_decoding` stored.
        """
        B, T, _ = x.shape
        q = self._heads(self.q(x))  # (B, H, T, D)
        if not self.is_cross:
            k, v = self.project_kv(x)
            if self.kv_cache is not None and cache_slots is not None:
                k, v = self.kv_cache.update(cache_slots, k, v)  # (B, H, S_max, D)
        elif kv_states is not None:
            k, v = self.project_kv(kv_states)  # (B, H, S, D)
        else:
            k, v = self.cross_kv.k, self.cross_kv.v  # computed once per prompt (seq2seq_decoder)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def position_bias(self, query_positions: torch.Tensor, key_positions: torch.Tensor, bidirectional: bool,
                      config: Seq2SeqConfig) -> torch.Tensor:
        """Query positions (T,) or per row (B, T), key positions (S,) -> the learned bias (1|B, H, T, S)."""
        buckets = relative_position_bucket(key_positions - query_positions[..., None], bidirectional,
                                           config.relative_attention_num_buckets,
                                           config.relative_attention_max_distance)  # (..., T, S)
        bias = self.relative_attention_bias(buckets).movedim(-1, -3)  # (..., H, T, S)
        return bias if bias.dim() == 4 else bias[None]


class FeedForward(nn.Module):
    """T5's DenseReluDense: wo(act(wi(x))), or gated: wo(act(wi_0(x)) * wi_1(x))."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gated = config.mlp_kind.startswith("gated-")
        self.act = _ACTIVATIONS[config.mlp_kind]
        if self.gated:
            self.wi_0, self.wi_1 = Linear(d, f, bias=False), Linear(d, f, bias=False)
        else:
            self.wi = Linear(d, f, bias=False)
        self.wo = Linear(f, d, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))  # (B, T, F)
        return self.wo(self.dropout(h))


class _Sublayer(nn.Module):
    """x + dropout(f(norm(x))) for one of a block's parts, under T5's module names."""

    def __init__(self, name: str, module: nn.Module, config: Seq2SeqConfig):
        super().__init__()
        self.add_module(name, module)
        self.inner = name
        self.layer_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return x + self.dropout(getattr(self, self.inner)(self.layer_norm(x), *args))


class T5Block(nn.Module):
    """Self-attention, (decoder: cross-attention,) feed-forward: `layer.0`, `layer.1`, (`layer.2`)."""

    def __init__(self, config: Seq2SeqConfig, is_decoder: bool, has_relative_bias: bool):
        super().__init__()
        parts = [_Sublayer("SelfAttention", T5Attention(config, has_relative_bias), config)]
        if is_decoder:
            parts.append(_Sublayer("EncDecAttention", T5Attention(config, False, is_cross=True), config))
        parts.append(_Sublayer("DenseReluDense", FeedForward(config), config))
        self.layer = nn.ModuleList(parts)
        self.is_decoder = is_decoder

    def forward(self, x: torch.Tensor, self_bias: torch.Tensor, encoder_states: torch.Tensor | None = None,
                cross_bias: torch.Tensor | None = None, cache_slots: torch.Tensor | None = None) -> torch.Tensor:
        x = self.layer[0](x, self_bias, None, cache_slots)
        if self.is_decoder:
            x = self.layer[1](x, cross_bias, encoder_states)
        return self.layer[-1](x)


class Stack(nn.Module):
    """The encoder or the decoder: blocks and a final norm (the token embeddings are the model's `shared`)."""

    def __init__(self, config: Seq2SeqConfig, is_decoder: bool):
        super().__init__()
        layers = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList(T5Block(config, is_decoder, has_relative_bias=i == 0) for i in range(layers))
        self.final_layer_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.is_decoder = is_decoder

    @property
    def relative_bias(self) -> T5Attention:
        return self.block[0].layer[0].SelfAttention


def _additive(mask: torch.Tensor) -> torch.Tensor:
    """Boolean mask (True = attend) -> 0 / -inf float, for adding to attention scores."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))


class Seq2Seq(nn.Module):
    """A T5-style encoder-decoder. `model(input_ids, attention_mask, decoder_input_ids)` -> logits (B, T, V);
    with `targets` (B, T), the cross-entropy summed over the targets that are not `ignore_index`."""

    is_encoder_decoder = True  # lmstack.generate binds its decoder to the encoded prompts (seq2seq_decoder)

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder = Stack(config, is_decoder=False)
        self.decoder = Stack(config, is_decoder=True)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight
        self.gradient_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """T5's initialisation (factor = init_std): embeddings N(0, f), q N(0, f (d D)^-1/2), k/v/o and the
        feed-forward N(0, f fan_in^-1/2), relative biases N(0, f d^-1/2), norms one; an untied head N(0, f d^-1/2)."""
        f, d = self.config.init_std, self.config.hidden_size
        nn.init.normal_(self.shared.weight, std=f)
        if not self.config.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=f * d**-0.5)
        for module in self.modules():
            if isinstance(module, T5Attention):
                nn.init.normal_(module.q.weight, std=f * (d * module.head_dim) ** -0.5)
                for linear in (module.k, module.v):
                    nn.init.normal_(linear.weight, std=f * d**-0.5)
                nn.init.normal_(module.o.weight, std=f * (module.num_heads * module.head_dim) ** -0.5)
                if hasattr(module, "relative_attention_bias"):
                    nn.init.normal_(module.relative_attention_bias.weight, std=f * d**-0.5)
            elif isinstance(module, FeedForward):
                for linear in (getattr(module, n) for n in ("wi", "wi_0", "wi_1") if hasattr(module, n)):
                    nn.init.normal_(linear.weight, std=f * d**-0.5)
                nn.init.normal_(module.wo.weight, std=f * self.config.intermediate_size**-0.5)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)

    # ---------------------------------------------------------------- the two stacks
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, S) -> encoder states (B, S, d). attention_mask (B, S): 1 = token, 0 = padding."""
        S = input_ids.shape[1]
        self._check_length(S, "input")
        positions = torch.arange(S, device=input_ids.device)
        bias = self.encoder.relative_bias.position_bias(positions, positions, True, self.config)  # (1, H, S, S)
        if attention_mask is not None:
            bias = bias + _additive(attention_mask.bool()[:, None, None, :])  # (B, H, S, S)
        x = self.encoder.dropout(self.shared(input_ids))
        for block in self.encoder.block:
            x = self._run(block, x, bias)
        return self.encoder.dropout(self.encoder.final_layer_norm(x))

    def decode(self, decoder_input_ids: torch.Tensor, encoder_states: torch.Tensor | None,
               encoder_mask: torch.Tensor | None = None, cache_slots: torch.Tensor | None = None) -> torch.Tensor:
        """decoder_input_ids (B, T) -> decoder states (B, T, d), before the head.

        Training / scoring: pass encoder_states (B, S, d) and its mask. Decoding (with the caches that
        lmstack.model.seq2seq_decoder installs): encoder_states None, `cache_slots` (T,) or per row (B, T) the
        positions of these tokens.
        """
        T = decoder_input_ids.shape[1]
        device = decoder_input_ids.device
        if cache_slots is not None:
            cache = self.decoder.block[0].layer[0].SelfAttention.kv_cache
            if cache is None:
                raise RuntimeError("cache_slots given but no decoder cache; decode through seq2seq_decoder")
            query_positions, key_positions = cache_slots, torch.arange(cache.k.shape[2], device=device)
        else:
            self._check_length(T, "decoder input")
            query_positions = key_positions = torch.arange(T, device=device)
        bias = self.decoder.relative_bias.position_bias(query_positions, key_positions, False, self.config)
        causal = _additive(key_positions <= query_positions[..., None])  # (..., T, S)
        bias = bias + (causal[None, None] if causal.dim() == 2 else causal[:, None])  # (1|B, H, T, S)
        cross = (torch.zeros(1, 1, 1, 1, device=device) if encoder_mask is None
                 else _additive(encoder_mask.bool()[:, None, None, :]))  # (B|1, 1, 1, S_enc)
        x = self.decoder.dropout(self.shared(decoder_input_ids))
        for block in self.decoder.block:
            x = self._run(block, x, bias, encoder_states, cross, cache_slots)
        return self.decoder.dropout(self.decoder.final_layer_norm(x))

    def _run(self, block: T5Block, x: torch.Tensor, *args) -> torch.Tensor:
        if self.gradient_checkpointing and self.training:
            return checkpoint(block, x, *args, use_reentrant=False)
        return block(x, *args)

    def _check_length(self, length: int, what: str) -> None:
        if length > self.config.max_seq_len:
            raise ConfigError(f"{what} length {length} exceeds the model's max_seq_len {self.config.max_seq_len}")

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder states (..., d) -> logits (..., V) (scaled by d^-0.5 first when the config says so)."""
        return self.lm_head(self._scale(hidden))

    def _scale(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * self.config.hidden_size**-0.5 if self.config.scale_decoder_outputs else hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                ignore_index: int = -100) -> torch.Tensor:
        """input_ids (B, S) and decoder_input_ids (B, T) -> logits (B, T, V).

        With `targets` (B, T) (and decoder_input_ids None: they are the targets shifted right behind
        decoder_start_token_id, as transformers' `labels`) it returns the cross-entropy summed over the
        targets that are not `ignore_index`, the head fused with the loss where it can be.
        """
        if decoder_input_ids is None:
            if targets is None:
                raise ValueError("pass decoder_input_ids or targets")
            decoder_input_ids = self.shift_right(targets, ignore_index)
        hidden = self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)
        if targets is None:
            return self.head(hidden)
        if isinstance(self.lm_head, nn.Linear) and self.lm_head.bias is None:
            return linear_cross_entropy(self._scale(hidden), self.lm_head.weight, targets, ignore_index)
        logits = self.head(hidden)
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index,
                               reduction="sum")

    def shift_right(self, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """targets (B, T) -> decoder inputs (B, T): decoder_start_token_id then targets[:, :-1], ignored -> pad."""
        start = torch.full_like(targets[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, targets[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == ignore_index, self.config.pad_token_id)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counted once); optionally without the shared embedding."""
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen or (exclude_embeddings and name == "shared.weight"):
                continue
            seen.add(id(p))
            total += p.numel()
        return total


__all__ = ["Seq2Seq", "T5Attention", "T5Block", "relative_position_bucket"]
