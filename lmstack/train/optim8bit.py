"""AdamW with 8-bit moments: the optimizer-memory saving that paged / 8-bit optimizers give on GPUs, on any device.

bitsandbytes' block-wise 8-bit Adam (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"),
written in torch: each moment tensor is cut into blocks of 256 values; a block keeps its absolute maximum
(fp32) and one byte per value, the index of the nearest entry of a dynamic map (signed for the first moment,
unsigned for the second: bitsandbytes' `create_dynamic_map`, fine steps near zero, coarse near one). Each
step dequantizes a moment, updates it exactly as AdamW does (bitsandbytes' arithmetic), and quantizes it
again with the block's new maximum. State: 2 bytes + 8 / 256 per parameter instead of 8, so a full
fine-tune's optimizer state shrinks about 3.9x. Tensors under `min_8bit_size` values (norms, biases) keep
fp32 moments, as bitsandbytes does: their share is small and their statistics are the least regular.

    optimizer = AdamW8bit(model.parameters(), lr=1e-4)          # or FinetuneConfig.optimizer: adamw8bit
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lmstack.errors import TrainingError
from lmstack.train.config import OptimConfig
from lmstack.train.optim import parameter_groups

BLOCK = 256


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' `create_dynamic_map(signed)`: 256 sorted values in [-1, 1] ([0, 1] unsigned), computed the same
    way (fp32 linspace and products) so that the maps are bit-identical."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += (10 ** (-(max_exponent_bits - 1) + i) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape, n values) -> (codes (n,) uint8, absmax (ceil(n / 256),) fp32): nearest code of x / absmax."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // BLOCK)
    padded = torch.zeros(blocks * BLOCK, device=x.device)
    padded[:n] = flat
    padded = padded.view(blocks, BLOCK)  # (blocks, 256)
    absmax = padded.abs().amax(dim=1)
    scaled = (padded / absmax.clamp(min=1e-38)[:, None]).clamp(-1, 1).view(-1)[:n]
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints).to(torch.uint8), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """(n,) uint8 codes + (blocks,) absmax -> (n,) fp32."""
    n = codes.numel()
    values = code[codes.long()]
    return (values * absmax.repeat_interleave(BLOCK)[:n]) if n % BLOCK else (values.view(-1, BLOCK) * absmax[:, None]).view(-1)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose moments are stored block-wise in 8 bits; see the module docstring."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, min_8bit_size: int = 4096):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.min_8bit_size = min_8bit_size
        self._maps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _codes(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._maps:
            self._maps[device] = dynamic_map(True).to(device), dynamic_map(False).to(device)
        return self._maps[device]

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        if p.numel() >= self.min_8bit_size:
            blocks = -(-p.numel() // BLOCK)
            for name in ("exp_avg", "exp_avg_sq"):
                state[name] = torch.zeros(p.numel(), dtype=torch.uint8, device=p.device)
                state[f"{name}_absmax"] = torch.zeros(blocks, device=p.device)
            # code 0 of the signed map is -1, not 0: the zero moment is its own index
            state["exp_avg"].fill_(int(torch.argmin(self._codes(p.device)[0].abs())))
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts every state tensor to its parameter's dtype on load: the 8-bit codes become uint8 again
        (exactly: they are the integers 0..255)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if "exp_avg_absmax" in state:
                state["exp_avg"] = state["exp_avg"].to(torch.uint8)
                state["exp_avg_sq"] = state["exp_avg_sq"].to(torch.uint8)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p] if self.state[p] else self._init_state(p)
                state["step"] += 1
                step = int(state["step"].item())
                grad = p.grad.float().reshape(-1)
                quantized = state["exp_avg"].dtype == torch.uint8
                if quantized:
                    signed, unsigned = self._codes(p.device)
                    m = dequantize_blockwise(state["exp_avg"], state["exp_avg_absmax"], signed)
                    v = dequantize_blockwise(state["exp_avg_sq"], state["exp_avg_sq_absmax"], unsigned)
                else:
                    m, v = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
                m.mul_(beta1).add_(grad, alpha=1.0 - beta1)  # bitsandbytes' order of operations
                v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = (v.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
                flat = p.view(-1) if p.dtype == torch.float32 else p.float().view(-1)
                if weight_decay > 0.0:
                    flat.mul_(1.0 - lr * weight_decay)
                flat.addcdiv_(m, denom, value=-lr / (1.0 - beta1**step))
                if flat.data_ptr() != p.data_ptr():
                    p.copy_(flat.view_as(p))
                if quantized:
                    state["exp_avg"], state["exp_avg_absmax"] = quantize_blockwise(m, signed)
                    state["exp_avg_sq"], state["exp_avg_sq_absmax"] = quantize_blockwise(v, unsigned)
        return loss


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimizer's state tensors hold (moments, scales, step counters)."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def build_adamw8bit(model: nn.Module, cfg: OptimConfig,
                    groups_of: Callable[[nn.Module, OptimConfig], list[dict]] = parameter_groups) -> AdamW8bit:
    """The engine's `make_optimizer` for an 8-bit AdamW with the same groups and hyper-parameters as build_optimizer."""
    groups = groups_of(model, cfg)
    if not any(group["params"] for group in groups):
        raise TrainingError("the model has no trainable parameters (every parameter has requires_grad=False)")
    return AdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


__all__ = ["AdamW8bit", "build_adamw8bit", "dequantize_blockwise", "dynamic_map", "quantize_blockwise", "state_bytes"]
