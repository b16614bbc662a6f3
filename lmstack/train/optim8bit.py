"""AdamW with 8-bit moments: the optimizer-memory saving that paged / 8-bit optimizers give on GPUs, on any device.

bitsandbytes' block-wise 8-bit Adam (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"),
written in torch: each moment tensor is cut into blocks of 256 values; a block keeps its absolute maximum
(fp32) and one byte per value, the index of the nearest entry of a dynamic map (signed for the first moment,
unsigned for the second: bitsandbytes' `create_dynamic_map`, fine steps near zero, coarse near one). Each
step dequantizes a moment, updates it exactly as AdamW does (bitsandbytes' arithmetic), and quantizes it
again with the block's new maximum, `chunk_size` values (256 blocks) at a time: the fp32 temporaries are a
few hundred KB that stay in cache, never a whole tensor's worth (the 8192 x 512 embedding's would be ~150 MB).
Blocks are independent, so chunking changes nothing in the numbers. State: 2 bytes + 8 / 256 per parameter instead of 8, so a full
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


class CodeSearch:
    """The nearest entry of a sorted 256-value map for every value of a tensor, without a binary search.

    `torch.bucketize` over the 255 midpoints costs ~8 dependent comparisons per value (it was 0.4 us per value,
    most of the 8-bit step). Instead: a float32's top 16 bits (sign, exponent, 7 mantissa bits) name a range of
    values 1/128 of an octave wide; a table gives, per range, how many midpoints lie below it (`base`), and at
    most one midpoint lies inside it (the dynamic maps' neighbouring entries are >1% apart; checked when the
    table is built), so the answer is `base + (x > midpoint[base])`: two gathers and a comparison per value,
    equal to bucketize's answer for every float."""

    def __init__(self, code: torch.Tensor):
        midpoints = (code[:-1] + code[1:]) / 2
        keys = torch.arange(-2**15, 2**15, dtype=torch.int32)  # every top-16-bit pattern, as bits >> 16 gives it
        ends = torch.stack([keys << 16, (keys << 16) | 0xFFFF]).view(torch.float32)  # (2, 65536) the range's ends
        low, high = ends.min(dim=0).values, ends.max(dim=0).values
        finite = low.isfinite() & high.isfinite()
        low, high = torch.where(finite, low, 0.0), torch.where(finite, high, 0.0)  # NaN ranges: never looked up
        base = torch.bucketize(low, midpoints, out_int32=True)
        if (torch.bucketize(high, midpoints, out_int32=True) - base).max() > 1:
            raise ValueError("CodeSearch: two midpoints of this map fall in one 1/128-octave range")
        self.base = base  # (65536,) int32
        self.midpoints = torch.cat([midpoints, midpoints.new_tensor([float("inf")])])  # (256,): base 255 never steps up

    def to(self, device: torch.device) -> "CodeSearch":
        self.base, self.midpoints = self.base.to(device), self.midpoints.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(n,) fp32 -> (n,) int32 indices of the nearest map entries (ties as torch.bucketize: the lower one)."""
        base = self.base.index_select(0, (x.view(torch.int32) >> 16).add_(2**15))
        return base.add_(x > self.midpoints.index_select(0, base))


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                       search: CodeSearch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape, n values) -> (codes (n,) uint8, absmax (ceil(n / 256),) fp32): the nearest code of x / absmax,
    every block at once. `out` = (codes, absmax) tensors to write into (the optimizer's state, in place);
    `search` = the map's CodeSearch when the caller keeps one (building it takes a few ms)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // BLOCK)
    padded = torch.nn.functional.pad(flat, (0, blocks * BLOCK - n)).view(blocks, BLOCK)  # (blocks, 256)
    absmax = padded.abs().amax(dim=1) if out is None else torch.amax(padded.abs(), dim=1, out=out[1])
    scaled = (padded / absmax.clamp(min=1e-38)[:, None]).clamp_(-1, 1).view(-1)[:n].contiguous()
    index = (search or CodeSearch(code.cpu()).to(x.device))(scaled)
    if out is None:
        return index.to(torch.uint8), absmax
    out[0].copy_(index)
    return out


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """(n,) uint8 codes + (blocks,) absmax -> (n,) fp32, every block at once (one gather, one broadcast multiply)."""
    n = codes.numel()
    values = code.index_select(0, codes.int())
    if n % BLOCK == 0:
        return (values.view(-1, BLOCK) * absmax[:, None]).view(-1)
    padded = torch.nn.functional.pad(values, (0, absmax.numel() * BLOCK - n)).view(-1, BLOCK)
    return (padded * absmax[:, None]).view(-1)[:n]


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose moments are stored block-wise in 8 bits; see the module docstring."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, min_8bit_size: int = 4096, chunk_size: int = 65536,
                 threads: int | None = 1):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        if chunk_size <= 0 or chunk_size % BLOCK:
            raise TrainingError(f"AdamW8bit: chunk_size must be a positive multiple of {BLOCK}, got {chunk_size}")
        self.min_8bit_size, self.chunk_size = min_8bit_size, chunk_size
        # intra-op threads during the update (None: leave torch's setting). A chunk's ops take tens of microseconds,
        # too little to split: on a loaded 2-core machine two threads made the step 4-9x slower than one (each op
        # waits for a descheduled sibling thread), and one thread was faster than bitsandbytes' CPU kernel.
        self.threads = threads
        self._maps: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _codes(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(signed map, unsigned map, their CodeSearch tables): made once per device, not per chunk."""
        if device not in self._maps:
            signed, unsigned = dynamic_map(True), dynamic_map(False)
            self._maps[device] = (signed.to(device), unsigned.to(device), CodeSearch(signed).to(device),
                                  CodeSearch(unsigned).to(device))
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
        threads = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            self._step()
        finally:
            torch.set_num_threads(threads)
        return loss

    def _step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p] if self.state[p] else self._init_state(p)
                state["step"] += 1
                step = int(state["step"].item())
                if state["exp_avg"].dtype == torch.uint8:
                    self._update_8bit(p, state, group, step)
                else:
                    _adamw_update(p.view(-1), p.grad.reshape(-1), state["exp_avg"].view(-1),
                                  state["exp_avg_sq"].view(-1), group, step)

    def _update_8bit(self, p: torch.Tensor, state: dict, group: dict, step: int) -> None:
        """AdamW on 8-bit moments, `chunk_size` values at a time: each chunk's moments are dequantized into fp32
        buffers of that size, updated with the parameter's slice and requantized in place, so the fp32
        temporaries stay a few hundred KB (cache-resident) whatever the tensor's size."""
        signed, unsigned, signed_mid, unsigned_mid = self._codes(p.device)
        n = p.numel()
        flat = p.view(-1) if p.dtype == torch.float32 and p.is_contiguous() else p.detach().float().reshape(-1)
        grad = p.grad.reshape(-1)
        for start in range(0, n, self.chunk_size):
            end = min(start + self.chunk_size, n)
            blocks = slice(start // BLOCK, -(-end // BLOCK))
            m_codes, v_codes = state["exp_avg"][start:end], state["exp_avg_sq"][start:end]
            m = dequantize_blockwise(m_codes, state["exp_avg_absmax"][blocks], signed)
            v = dequantize_blockwise(v_codes, state["exp_avg_sq_absmax"][blocks], unsigned)
            _adamw_update(flat[start:end], grad[start:end].float(), m, v, group, step)
            quantize_blockwise(m, signed, (m_codes, state["exp_avg_absmax"][blocks]), signed_mid)
            quantize_blockwise(v, unsigned, (v_codes, state["exp_avg_sq_absmax"][blocks]), unsigned_mid)
        if flat.data_ptr() != p.data_ptr():
            p.copy_(flat.view_as(p))


def _adamw_update(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, group: dict,
                  step: int) -> None:
    """One AdamW step on flat fp32 views, in place (bitsandbytes' order of operations)."""
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = (v.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
    if weight_decay > 0.0:
        p.mul_(1.0 - lr * weight_decay)
    p.addcdiv_(m, denom, value=-lr / (1.0 - beta1**step))


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


__all__ = ["AdamW8bit", "CodeSearch", "build_adamw8bit", "dequantize_blockwise", "dynamic_map", "quantize_blockwise", "state_bytes"]
