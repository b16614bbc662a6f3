"""A sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Switch) and its router losses.

Each token's router logits pick its top-k experts (SwiGLU MLPs); their outputs are mixed by the
router's probabilities, renormalised over the k chosen experts (Mixtral) or not (Switch, Qwen2-MoE).
Qwen2-MoE adds a shared expert every token uses, scaled by a sigmoid gate. The (token, expert)
assignments are sorted by expert, so each expert runs once on all of its tokens: a loop over the E
experts (each a dense GEMM), never over tokens.

With `capacity_factor` (training only, as in Switch), an expert takes at most
ceil(capacity_factor * N * k / E) of the N tokens' assignments, first come first served in token
order; the rest are dropped (that expert adds nothing to the token, the residual carries it) and
counted. Inference never drops, so logits match transformers' Mixtral / Qwen2-MoE.

The layer keeps its last router logits (`router_logits`, (N, E), in the graph) for the auxiliary losses,
which the training objective adds (lmstack.train.objectives.moe):
    load balancing (Switch eq. 4, transformers' Mixtral): E * sum_e f_e * P_e over all layers' tokens,
        f_e = share of the N*k assignments that went to expert e (sums to k), P_e = mean router probability
    z-loss (ST-MoE): mean over tokens of logsumexp(router logits)^2

Shapes: B batch, T tokens, N = B*T, d width, E experts, k experts per token.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ModelConfig, MoEConfig
from lmstack.model.linear import Linear
from lmstack.model.mlp import MLP


class SparseMoE(nn.Module):
    """x (B, T, d) -> (B, T, d) through each token's top-k experts. Names follow Qwen2-MoE (`gate`, `experts.N`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        moe = config.moe
        self.num_experts, self.top_k = moe.num_experts, moe.num_experts_per_tok
        self.normalize_topk, self.capacity_factor = moe.normalize_topk, moe.capacity_factor
        expert = dataclasses.replace(config, intermediate_size=moe.intermediate_size or config.intermediate_size,
                                     mlp_kind="swiglu", mlp_bias=False, moe=MoEConfig())
        self.gate = Linear(config.hidden_size, moe.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(MLP(expert) for _ in range(moe.num_experts))
        if moe.shared_expert_intermediate_size:
            self.shared_expert = MLP(dataclasses.replace(expert, intermediate_size=moe.shared_expert_intermediate_size))
            self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False)
        self.router_logits: torch.Tensor | None = None  # (N, E) of the last forward, for the auxiliary losses
        self.dropped = 0  # assignments dropped by the capacity limit in the last forward

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d) -> router logits (N, E), chosen experts (N, k), their weights (N, k) in x's dtype."""
        logits = self.gate(x)  # (N, E)
        probs = logits.float().softmax(dim=-1)  # fp32, as transformers
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k) each
        if self.normalize_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, chosen, weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(B * T, d)  # (N, d)
        logits, chosen, weights = self.route(flat)
        self.router_logits = logits
        # Sort the N*k (token, expert) assignments by expert: each expert's tokens become one contiguous run.
        expert_of = chosen.reshape(-1)  # (N*k,), token-major
        order = expert_of.argsort(stable=True)  # (N*k,): stable, so a run keeps token order (capacity: first come)
        token_of = order // self.top_k  # (N*k,) the token of each sorted assignment
        weight_of = weights.reshape(-1)[order]  # (N*k,)
        counts = torch.bincount(expert_of, minlength=self.num_experts).tolist()  # one host sync per layer
        capacity = self._capacity(B * T)
        out = torch.zeros_like(flat)
        self.dropped = 0
        for e, (tokens, w) in enumerate(zip(token_of.split(counts), weight_of.split(counts))):
            if capacity is not None and len(tokens) > capacity:
                self.dropped += len(tokens) - capacity
                tokens, w = tokens[:capacity], w[:capacity]
            if len(tokens):
                out.index_add_(0, tokens, self.experts[e](flat[tokens]) * w[:, None])  # (n_e, d)
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.view(B, T, d)

    def _capacity(self, tokens: int) -> int | None:
        if self.capacity_factor is None or not self.training:
            return None
        return math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts)


def moe_layers(model: nn.Module) -> list[SparseMoE]:
    """The model's MoE layers, in order (through DDP / compile wrappers: they are submodules)."""
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, mask: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch / Mixtral load-balancing loss over every layer's tokens -> (loss, assignment share per expert (E,)).

    router_logits: per layer (N, E); mask: (N,) 1 for real tokens, 0 for padding (left out), or None.
    The share f_e sums to k over experts; the loss E * sum_e f_e * P_e is k when routing is perfectly balanced.
    """
    E = router_logits[0].shape[-1]
    weight = None if mask is None else mask.reshape(-1).float()
    assigned = torch.zeros(E, dtype=torch.float32, device=router_logits[0].device)
    prob_sum = torch.zeros_like(assigned)
    rows = 0.0
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)  # (N, E)
        chosen = probs.topk(top_k, dim=-1).indices  # (N, k)
        hits = F.one_hot(chosen, E).sum(dim=1).float()  # (N, E): 1 where the token went to the expert
        if weight is not None:
            hits, probs = hits * weight[:, None], probs * weight[:, None]
        assigned = assigned + hits.sum(dim=0)
        prob_sum = prob_sum + probs.sum(dim=0)
        rows = rows + (weight.sum() if weight is not None else probs.shape[0])
    share, mean_prob = assigned / rows, prob_sum / rows
    return E * (share * mean_prob).sum(), share.detach()


def router_z_loss(router_logits: list[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's z-loss: mean over every layer's (real) tokens of logsumexp(router logits)^2."""
    total, rows = 0.0, 0.0
    for logits in router_logits:
        z = torch.logsumexp(logits.float(), dim=-1) ** 2  # (N,)
        if mask is not None:
            weight = mask.reshape(-1).float()
            total, rows = total + (z * weight).sum(), rows + weight.sum()
        else:
            total, rows = total + z.sum(), rows + z.numel()
    return total / rows


__all__ = ["SparseMoE", "load_balancing_loss", "moe_layers", "router_z_loss"]
