"""The one Transformer: token (+ position) embeddings, N pre-norm blocks, a final norm and the LM head.

Parameter names are Hugging Face's Llama names (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`,
`model.layers.N.mlp.down_proj`, `model.norm`, `lm_head`), so Llama/Mistral/Qwen2 checkpoints load by
identity and LoRA `target_modules` match peft. GPT-2 is the same module tree with learned positions,
LayerNorm, GELU and biases; its fused Conv1D weights are converted in `lmstack.interop.hf`.

Shapes: B batch, T query tokens, S key slots (T, or the KV-cache length), H heads, D head dim, d width, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmstack.config import ModelConfig
from lmstack.errors import ConfigError
from lmstack.model.adaptive_softmax import AdaptiveSoftmaxHead
from lmstack.model.attention import Attention
from lmstack.model.head_loss import linear_cross_entropy
from lmstack.model.kv_cache import KVCache
from lmstack.model.linear import Linear
from lmstack.model.mlp import MLP
from lmstack.model.moe import SparseMoE
from lmstack.model.norm import build_norm
from lmstack.model.rope import rope_cos_sin, rope_inv_freq, sinusoidal_embedding


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = build_norm(config)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = build_norm(config)
        self.mlp = SparseMoE(config) if config.moe.num_experts else MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, cache_slots: torch.Tensor | None = None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), rope, mask, cache_slots, prefix))
        return x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    """A decoder-only language model. `model(input_ids)` (B, T) -> logits (B, T, V).

    Provides `lmstack.model.protocol.CausalLM`, what the engine, the generator and the server call.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        embeddings: dict[str, nn.Module] = {"embed_tokens": nn.Embedding(config.vocab_size, config.hidden_size)}
        if config.position_kind == "learned":
            embeddings["embed_positions"] = nn.Embedding(config.max_seq_len, config.hidden_size)
        self.model = nn.ModuleDict({
            **embeddings,
            "layers": nn.ModuleList(Block(config) for _ in range(config.num_layers)),
            "norm": build_norm(config),
        })
        self.lm_head = (AdaptiveSoftmaxHead(config.hidden_size, config.vocab_size, config.head_cutoffs,
                                            config.head_div_value)  # log-probabilities by frequency clusters
                        if config.head_cutoffs else Linear(config.hidden_size, config.vocab_size, bias=False))
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.embed_dropout = nn.Dropout(config.dropout)
        self.gradient_checkpointing = False  # recompute each block in backward: less memory, ~1/3 more compute
        # Keys/values every layer attends to before the tokens (prompt, P- and prefix tuning: lmstack.adapters.prompt,
        # .prefix): a module swapped in by name, model.kv_prefix(model) -> per layer (k, v), each (1, H_kv, P, D).
        self.kv_prefix: nn.Module | None = None
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()
        self.reset_buffers()

    # ---------------------------------------------------------------- initialisation
    def reset_parameters(self) -> None:
        """GPT-2 / Llama practice: N(0, init_std) weights; the two projections that write into the residual
        stream (o_proj, down_proj) get init_std / sqrt(2 * num_layers) so the stream's variance stays O(1)
        with depth; biases zero, norm gains one."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (RoPE frequencies), e.g. after building on the meta device."""
        device = self.model.embed_tokens.weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        self.inv_freq = rope_inv_freq(self.config, device) if self.config.position_kind == "rope" else torch.empty(0)

    # ---------------------------------------------------------------- KV cache
    def make_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> list[KVCache]:
        """A static KV cache per layer, `max_len` slots for `batch_size` rows; `use_caches` installs it."""
        if max_len > self.config.max_seq_len and self.config.position_kind == "learned":
            raise ConfigError(f"cache length {max_len} exceeds the model's max_seq_len {self.config.max_seq_len}")
        weight = self.model.embed_tokens.weight
        return [KVCache(batch_size, self.config.num_kv_heads, max_len, self.config.head_dim,
                        dtype or weight.dtype, device or weight.device) for _ in self.model.layers]

    def setup_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> None:
        """Allocate and install a static KV cache of `max_len` slots for `batch_size` rows in every layer."""
        self.use_caches(self.make_cache(batch_size, max_len, dtype, device))

    def kv_caches(self) -> list[KVCache | None]:
        """The installed per-layer caches (None where there is none)."""
        return [block.self_attn.kv_cache for block in self.model.layers]

    def use_caches(self, caches: list[KVCache | None]) -> None:
        """Install per-layer caches (from `make_cache` or an earlier `kv_caches()`)."""
        for block, cache in zip(self.model.layers, caches, strict=True):
            block.self_attn.kv_cache = cache

    def clear_cache(self) -> None:
        self.use_caches([None] * len(self.model.layers))

    @property
    def cache_len(self) -> int | None:
        cache = self.model.layers[0].self_attn.kv_cache
        return None if cache is None else cache.k.shape[2]

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache_slots: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V). See `hidden_states` for the arguments.

        With `targets` (B, T) it returns instead the cross-entropy summed over the targets that are
        not `ignore_index` (an fp32 scalar), computed through the head in chunks so that the (B, T, V)
        logits never exist at once (lmstack.model.head_loss). Inside forward, so that torch.compile,
        DDP and FSDP see the head's weight used where they expect it.
        """
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, cache_slots)
        if targets is None:
            return self.head(hidden)
        if isinstance(self.lm_head, AdaptiveSoftmaxHead):  # computes only the clusters the targets fall in
            return self.lm_head.loss(hidden, targets, ignore_index)
        if isinstance(self.lm_head, nn.Linear) and self.lm_head.bias is None:
            return linear_cross_entropy(hidden, self.lm_head.weight, targets, ignore_index)
        logits = self.lm_head(hidden)  # a swapped head (adapter, quantized): its own forward
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index,
                               reduction="sum")

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., d) -> logits (..., V): the LM head (whatever module is swapped in as lm_head)."""
        return self.lm_head(hidden)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache_slots: torch.Tensor | None = None,
                      inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> final-norm hidden states (B, T, d).

        attention_mask: (B, T) without a cache, (B, S_max) over cache slots with one; 1 = real token, 0 = padding.
          Values above 1 are segment ids: several samples packed in one row (1, 2, ...) attend only within their
          own segment; pass their restarting position_ids too. Or a boolean (B, 1, T, S) mask used as given (True =
          may attend; it must let every query see at least itself), with explicit position_ids: any attention
          pattern, e.g. a tree of continuations sharing one context (lmstack.eval.loglikelihood).
        position_ids: (B, T); by default counted from the attention mask, so left-padded rows start at 0.
        cache_slots: cache slots to write this chunk's keys/values to (requires a KV cache): (T,) shared by
            every row, or (B, T) with each row at its own slots (rows of one batch at different lengths).
            A query at slot s attends to the keys at slots <= s, so slots past a row's own tokens are
            hidden even when they hold stale keys.
        inputs_embeds: (B, T, d) in place of the token embeddings (input_ids may then be None). The base model
            only: no kv_prefix (this is how a prompt-tuning module runs the model on its own virtual tokens).

        With a `kv_prefix` of P virtual tokens every query also attends to its P keys/values, and positions
        start at P (the virtual tokens hold 0..P-1), as peft's prompt, P- and prefix tuning have it.
        """
        B, T = input_ids.shape if inputs_embeds is None else inputs_embeds.shape[:2]
        use_cache = cache_slots is not None
        if use_cache and self.cache_len is None:
            raise RuntimeError("cache_slots given but no KV cache is set up; call model.setup_cache(...) first")
        if not use_cache and T > self.config.max_seq_len:
            raise ConfigError(f"sequence length {T} exceeds the model's max_seq_len {self.config.max_seq_len}")
        device = input_ids.device if inputs_embeds is None else inputs_embeds.device
        prefix = self.kv_prefix(self) if self.kv_prefix is not None and inputs_embeds is None else None
        P = 0 if prefix is None else prefix[0][0].shape[2]
        if P:
            self._check_prefix_fits(P, T, use_cache)
        if attention_mask is not None and attention_mask.dim() == 4:
            if position_ids is None or attention_mask.dtype != torch.bool:
                raise ValueError("a (B, 1, T, S) attention_mask must be boolean and comes with explicit position_ids")
            mask = attention_mask  # the caller's pattern: causality, padding and any window are its job
        else:
            if position_ids is None:
                position_ids = self._default_positions(B, T, attention_mask, cache_slots, device)
            mask = self._attention_mask(T, attention_mask, cache_slots, device)
        if P:
            position_ids = position_ids + P
            if mask is None:
                mask = torch.ones(T, T, dtype=torch.bool, device=device).tril().view(1, 1, T, T)
            mask = torch.cat([mask.new_ones(*mask.shape[:-1], P), mask], dim=-1)  # (B|1, 1, T, P + S)

        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        if self.config.position_kind == "learned":
            x = x + self.model.embed_positions(position_ids)
        elif self.config.position_kind == "sinusoidal":
            x = x + sinusoidal_embedding(position_ids, self.config.hidden_size).to(x.dtype)
        x = self.embed_dropout(x)
        rope = rope_cos_sin(self.inv_freq, position_ids, self.config) if self.config.position_kind == "rope" else None
        for i, block in enumerate(self.model.layers):
            layer_prefix = None if prefix is None else prefix[i]
            if self.gradient_checkpointing and self.training and not use_cache:
                x = checkpoint(block, x, rope, mask, cache_slots, layer_prefix, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache_slots, layer_prefix)
        return self.model.norm(x)

    def _check_prefix_fits(self, P: int, T: int, use_cache: bool) -> None:
        """Virtual tokens take positions 0..P-1: with learned positions the tokens after them must still fit."""
        length = self.cache_len if use_cache else T
        if P + length > self.config.max_seq_len and (self.config.position_kind == "learned" or not use_cache):
            raise ConfigError(f"{P} virtual tokens (kv_prefix) + {length} tokens exceed the model's max_seq_len "
                              f"{self.config.max_seq_len}; shorten the input (or the prompt/prefix)")

    def _default_positions(self, B: int, T: int, attention_mask: torch.Tensor | None,
                           cache_slots: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """(B, T) positions: slot index, or the count of real tokens before each one when a mask is given."""
        if attention_mask is None:
            slots = cache_slots if cache_slots is not None else torch.arange(T, device=device)
            return slots.expand(B, T)  # (T,) or (B, T) -> (B, T)
        counted = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T) or (B, S_max)
        if cache_slots is None:
            return counted
        return counted.gather(1, cache_slots.expand(B, T))

    def _attention_mask(self, T: int, attention_mask: torch.Tensor | None, cache_slots: torch.Tensor | None,
                        device: torch.device) -> torch.Tensor | None:
        """Boolean (B|1, 1, T, S) mask combining causality, padding and the sliding window; None = plain causal."""
        window = self.config.sliding_window
        if cache_slots is None:
            if attention_mask is None and (window is None or T <= window):
                return None  # SDPA's is_causal fast path
            query_slots = torch.arange(T, device=device)
            key_slots = query_slots
        else:
            query_slots = cache_slots  # (T,) shared, or (B, T) per row
            key_slots = torch.arange(self.cache_len, device=device)
        offset = query_slots[..., :, None] - key_slots  # (T, S) or (B, T, S)
        mask = offset >= 0
        if window is not None:
            mask = mask & (offset < window)
        mask = mask.view(-1, 1, *mask.shape[-2:])  # (B|1, 1, T, S)
        if attention_mask is not None:
            # 0 = padding; any other value is a segment id (all ones: one segment per row). A token attends
            # only to keys of its own segment, so packed samples (ids 1, 2, ...) never see each other.
            keys = attention_mask[:, None, :]  # (B, 1, S)
            queries = (attention_mask if cache_slots is None else attention_mask[:, cache_slots])[:, :, None]  # (B, T, 1)
            same = (keys != 0) & ((keys == queries) | (queries == 0))  # (B, T, S); a padding query sees all real keys
            mask = mask & same[:, None]  # (B, 1, T, S)
            # A padding query would see no key at all and SDPA would return NaN; let it see itself.
            mask = mask | (offset == 0).view(-1, 1, *offset.shape[-2:])
        return mask

    # ---------------------------------------------------------------- bookkeeping
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (tied weights counted once); optionally without the (input/position) embeddings."""
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if exclude_embeddings and ("embed_tokens" in name or "embed_positions" in name):
                continue
            total += p.numel()
        return total


