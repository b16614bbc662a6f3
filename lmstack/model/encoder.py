"""The BERT-style encoder: bidirectional attention over the whole input, for masked-LM pretraining, sentence
embeddings and classification.

    embeddings   word + learned position + token-type (segment) embeddings -> LayerNorm -> dropout
    N layers     post-norm: x = LN(x + attn(x)); x = LN(x + down(act(up(x))))  (as BERT, unlike the decoder)
    pooler       tanh(dense(h[:, 0])): the [CLS] state, for next-sentence prediction and classification
    heads        mlm: dense -> act -> LN -> tied decoder + bias; nsp: 2-way linear; classifier: num_labels

Parameter names are Hugging Face's BertForPreTraining / BertForSequenceClassification names
(`bert.embeddings.word_embeddings`, `bert.encoder.layer.N.attention.self.query`, `cls.predictions.*`,
`classifier`), so checkpoints convert by identity (lmstack.interop.hf_bert) and peft's BERT target
modules (`query`, `value`) match.

Shapes: B batch, T tokens, H heads, D head dim, d width, V vocab, M masked positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmstack.errors import ConfigError
from lmstack.model.configs import EncoderConfig
from lmstack.model.linear import Linear

_ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class EncoderLayer(nn.Module):
    """Bidirectional self-attention and a feed-forward block, each followed by residual add + LayerNorm."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.attention = nn.ModuleDict({
            "self": nn.ModuleDict({"query": Linear(d, d), "key": Linear(d, d), "value": Linear(d, d)}),
            "output": nn.ModuleDict({"dense": Linear(d, d), "LayerNorm": nn.LayerNorm(d, eps=config.norm_eps)}),
        })
        self.intermediate = nn.ModuleDict({"dense": Linear(d, config.intermediate_size)})
        self.output = nn.ModuleDict({"dense": Linear(config.intermediate_size, d),
                                     "LayerNorm": nn.LayerNorm(d, eps=config.norm_eps)})
        self.act = _ACTIVATIONS[config.mlp_kind]
        self.dropout = nn.Dropout(config.dropout)
        self.attention_dropout = config.attention_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, d), mask (B, 1, 1, T) boolean (True = a real key) or None -> (B, T, d)."""
        B, T, d = x.shape
        qkv = self.attention["self"]
        q, k, v = (qkv[name](x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for name in ("query", "key", "value"))  # (B, H, T, D) each
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attention_dropout if self.training else 0.0)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, d)
        out = self.attention["output"]
        x = out["LayerNorm"](x + self.dropout(out["dense"](y)))
        h = self.act(self.intermediate["dense"](x))  # (B, T, F)
        return self.output["LayerNorm"](x + self.dropout(self.output["dense"](h)))


class Encoder(nn.Module):
    """A BERT-style encoder with optional pooler and heads (`config.heads`: mlm, nsp, classifier).

    `model(input_ids, attention_mask, token_type_ids)` -> the last hidden states (B, T, d); the heads are
    methods (`mlm_logits`, `nsp_logits`, `classify`) so objectives compute only what they score.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        embeddings = nn.ModuleDict({
            "word_embeddings": nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id),
            "position_embeddings": nn.Embedding(config.max_seq_len, d),
            "token_type_embeddings": nn.Embedding(config.type_vocab_size, d),
            "LayerNorm": nn.LayerNorm(d, eps=config.norm_eps),
        })
        trunk = {"embeddings": embeddings,
                 "encoder": nn.ModuleDict({"layer": nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))})}
        if config.pooler:
            trunk["pooler"] = nn.ModuleDict({"dense": Linear(d, d)})
        self.bert = nn.ModuleDict(trunk)
        self.dropout = nn.Dropout(config.dropout)
        heads: dict[str, nn.Module] = {}
        if "mlm" in config.heads:
            transform = nn.ModuleDict({"dense": Linear(d, d), "LayerNorm": nn.LayerNorm(d, eps=config.norm_eps)})
            predictions = nn.ModuleDict({"transform": transform, "decoder": Linear(d, config.vocab_size, bias=False)})
            predictions.register_parameter("bias", nn.Parameter(torch.zeros(config.vocab_size)))
            predictions.decoder.weight = embeddings.word_embeddings.weight  # tied, as BERT
            heads["predictions"] = predictions
        if "nsp" in config.heads:
            heads["seq_relationship"] = Linear(d, 2)
        if heads:
            self.cls = nn.ModuleDict(heads)
        if "classifier" in config.heads:
            self.classifier = Linear(d, config.num_labels)
        self.gradient_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's initialisation: N(0, init_std) weights and embeddings, zero biases, unit LayerNorm gains."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if hasattr(self, "cls") and "predictions" in self.cls:
            nn.init.zeros_(self.cls.predictions.bias)
        if self.config.pad_token_id is not None:
            with torch.no_grad():
                self.bert.embeddings.word_embeddings.weight[self.config.pad_token_id].zero_()

    # ---------------------------------------------------------------- the trunk
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> hidden states (B, T, d). attention_mask (B, T): 1 = token, 0 = padding (pad on the
        right: positions count from 0 at the first column); token_type_ids (B, T): segment A = 0, B = 1."""
        return self.hidden_states(input_ids, attention_mask, token_type_ids)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.config.max_seq_len:
            raise ConfigError(f"sequence length {T} exceeds the encoder's max_seq_len {self.config.max_seq_len} "
                              "(its learned positions)")
        emb = self.bert.embeddings
        positions = torch.arange(T, device=input_ids.device)[None, :]  # (1, T)
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        x = emb.word_embeddings(input_ids) + emb.position_embeddings(positions) + emb.token_type_embeddings(types)
        x = self.dropout(emb.LayerNorm(x))  # (B, T, d)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.bert.encoder.layer:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """The pooler: hidden (B, T, d) -> tanh(dense(h[:, 0])) (B, d)."""
        return torch.tanh(self.bert.pooler.dense(hidden[:, 0]))

    # ---------------------------------------------------------------- heads
    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Masked-LM head: hidden (..., d) -> logits (..., V). Pass only the masked positions' states (M, d)."""
        p = self.cls.predictions
        h = p.transform.LayerNorm(_ACTIVATIONS[self.config.mlp_kind](p.transform.dense(hidden)))
        return p.decoder(h) + p.bias

    def nsp_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-sentence head: hidden (B, T, d) -> (B, 2) logits (index 0 = B follows A, 1 = B is random)."""
        return self.cls.seq_relationship(self.pooled(hidden))

    def classify(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Sequence classification: (B, T) -> (B, num_labels) logits from the pooled [CLS] state."""
        pooled = self.pooled(self.hidden_states(input_ids, attention_mask, token_type_ids))
        drop = self.config.classifier_dropout
        pooled = F.dropout(pooled, drop if drop is not None else self.config.dropout, self.training)
        return self.classifier(pooled)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (the tied decoder counted once); optionally without the embedding tables."""
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen or (exclude_embeddings and ".embeddings." in f".{name}"):
                continue
            seen.add(id(p))
            total += p.numel()
        return total


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, d), mask (B, T) -> the mean over real tokens (B, d)."""
    weight = attention_mask.to(hidden.dtype)[:, :, None]  # (B, T, 1)
    return (hidden * weight).sum(1) / weight.sum(1).clamp(min=1e-9)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Sentence-transformers' pooling modes: hidden (B, T, d), mask (B, T) -> (B, d)."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(~attention_mask.bool()[:, :, None], -math.inf).amax(1)
    if mode == "mean_sqrt_len":
        weight = attention_mask.to(hidden.dtype)[:, :, None]
        return (hidden * weight).sum(1) / weight.sum(1).clamp(min=1e-9).sqrt()
    return mean_pool(hidden, attention_mask)


__all__ = ["Encoder", "EncoderLayer", "mean_pool", "pool"]
