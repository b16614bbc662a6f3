"""Adaptive softmax (Grave et al. 2017) as torch's AdaptiveLogSoftmaxWithLoss defines it: a head for large
vocabularies whose rare words cost less.

Token ids must be ordered by frequency (id 0 the most frequent). The `cutoffs` split them into a shortlist
[0, c0) and tail clusters [c0, c1), [c1, c2), ..., [c_last, V). The head is one linear layer over the
shortlist plus one logit per tail cluster; cluster i has its own two-layer projection d -> d / div^(i+1) ->
its words. So log p(w) = log p_head(w) for a shortlist word, and log p_head(cluster) + log p_cluster(w)
otherwise. Training computes a tail only for the targets that fall in it, which is where the time goes
when most tokens are frequent; `forward` gives the full (..., V) log-probabilities (for generation,
where they serve as logits: softmax(log p) = p).

Parameter names and shapes are torch's (`head`, `tail.i.0`, `tail.i.1`), so its module loads this state dict.

Shapes: N tokens, d width, V vocabulary, H = c0 + clusters head outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AdaptiveSoftmaxHead(nn.Module):
    """hidden (..., d) -> log-probabilities (..., V); `loss(hidden, targets)` -> NLL summed over kept targets."""

    def __init__(self, in_features: int, vocab_size: int, cutoffs: list[int], div_value: float = 4.0,
                 head_bias: bool = False):
        super().__init__()
        cutoffs = list(cutoffs)
        if not cutoffs or cutoffs != sorted(set(cutoffs)) or cutoffs[0] <= 0 or cutoffs[-1] >= vocab_size:
            raise ValueError(f"cutoffs {cutoffs} must increase strictly within (0, {vocab_size})")
        self.cutoffs = cutoffs + [vocab_size]
        self.shortlist_size, self.n_clusters = cutoffs[0], len(cutoffs)
        self.vocab_size = vocab_size
        self.head = nn.Linear(in_features, self.shortlist_size + self.n_clusters, bias=head_bias)
        self.tail = nn.ModuleList(
            nn.Sequential(nn.Linear(in_features, int(in_features // div_value ** (i + 1)), bias=False),
                          nn.Linear(int(in_features // div_value ** (i + 1)), self.cutoffs[i + 1] - self.cutoffs[i],
                                    bias=False))
            for i in range(self.n_clusters))

    @property
    def weight(self) -> torch.Tensor:
        """The head's weight: where code asks a head for its device or dtype."""
        return self.head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., d) -> full log-probabilities (..., V) in fp32."""
        flat = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
        head = F.log_softmax(self.head(flat).float(), dim=-1)  # (N, H)
        parts = [head[:, :self.shortlist_size]]
        for i, tail in enumerate(self.tail):
            cluster = head[:, self.shortlist_size + i, None]  # (N, 1): log p(cluster i)
            parts.append(cluster + F.log_softmax(tail(flat).float(), dim=-1))  # (N, |cluster i|)
        return torch.cat(parts, dim=-1).view(*hidden.shape[:-1], self.vocab_size)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Negative log-likelihood of `targets` summed over those that are not `ignore_index` (fp32 scalar).

        hidden (..., d), targets (...). Each tail runs only on the rows whose target lies in its cluster.
        """
        flat, target = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        keep = target != ignore_index
        flat, target = flat[keep], target[keep]  # (N, d), (N,)
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= self.vocab_size):
            raise IndexError(f"target ids must lie in [0, {self.vocab_size}) or equal ignore_index {ignore_index}")
        head = F.log_softmax(self.head(flat).float(), dim=-1)  # (N, H)
        cluster = torch.bucketize(target, torch.tensor(self.cutoffs[:-1], device=target.device), right=True)  # (N,)
        head_index = torch.where(cluster == 0, target, self.shortlist_size + cluster - 1)
        total = -head.gather(1, head_index[:, None]).sum()
        for i, tail in enumerate(self.tail):
            rows = (cluster == i + 1).nonzero().squeeze(1)  # the targets in cluster i
            if rows.numel():
                tail_logp = F.log_softmax(tail(flat[rows]).float(), dim=-1)  # (n_i, |cluster i|)
                total = total - tail_logp.gather(1, (target[rows] - self.cutoffs[i])[:, None]).sum()
        return total


__all__ = ["AdaptiveSoftmaxHead"]
