"""The mixture-of-experts auxiliary losses as a `Loss` term, added to a model's main objective.

    loss = causal_lm_loss(model, ids, targets)
    loss = loss + router_losses(model, loss.count)      # after the forward that routed the tokens

The engine divides a step's summed totals by the step's count once, so an auxiliary term enters the
total multiplied by the micro-batch's count: after the division it weighs `router_aux_loss_coef`
(`router_z_loss_coef`), exactly as transformers adds `coef * aux_loss` to its mean loss, whatever the
micro-batch split. Metrics (each logged as sum / count over the step): `moe_aux_loss`, `moe_z_loss`,
`moe_tokens_e<i>` (the share of each token's k assignments that went to expert i, averaged over layers:
k / E when balanced) and `moe_dropped` (assignments over the capacity, per token, when a capacity is set).
"""

from __future__ import annotations

import torch
from torch import nn

from lmstack.model.moe import load_balancing_loss, moe_layers, router_z_loss
from lmstack.model.protocol import unwrap
from lmstack.train.objectives.loss import Loss


def router_losses(model: nn.Module, count: torch.Tensor | int, attention_mask: torch.Tensor | None = None) -> Loss:
    """The load-balancing and z-losses of the model's last forward, weighted by its MoEConfig; zero without experts.

    count: the main loss's item count (the term is scaled by it, see the module docstring).
    attention_mask: (B, T) of that forward, to leave padding out, or None.
    """
    layers = moe_layers(model)
    if not layers or layers[0].router_logits is None or not model.training:
        return Loss(torch.zeros(()), count)  # validation reports the language-modelling loss alone
    moe = unwrap(model).config.moe
    logits = [layer.router_logits for layer in layers]
    aux, share = load_balancing_loss(logits, moe.num_experts_per_tok, attention_mask)
    z = router_z_loss(logits, attention_mask)
    count_f = torch.as_tensor(count, dtype=torch.float32, device=aux.device)
    total = (moe.router_aux_loss_coef * aux + moe.router_z_loss_coef * z) * count_f
    metrics = {"moe_aux_loss": aux.detach() * count_f, "moe_z_loss": z.detach() * count_f}
    for e, value in enumerate(share):  # already averaged over layers
        metrics[f"moe_tokens_e{e}"] = value * count_f
    if moe.capacity_factor is not None:
        tokens = logits[0].shape[0]
        dropped = sum(layer.dropped for layer in layers) / (len(layers) * max(tokens, 1))
        metrics["moe_dropped"] = dropped * count_f
    return Loss(total, count, metrics)


__all__ = ["router_losses"]
