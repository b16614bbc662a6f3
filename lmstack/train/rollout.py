"""On-policy batches for PPO, GRPO and RLOO: sample from the policy being trained, score, prepare.

A batch source with `needs_model = True` (lmstack.train.engine): the engine calls micro_batches(step,
model) with the current model in eval mode. Every `epochs × minibatches` optimizer steps make one rollout:

  1. P prompts drawn from the prompt set, seeded from (seed, rollout index, rank): resume at a rollout
     boundary regenerates the same prompts and samples; a checkpoint taken inside a rollout (PPO's epochs)
     stores the rollout itself (`RolloutCheckpointStore`), so resume there is exact too;
  2. each prompt sampled G times (GRPO / RLOO: the group; PPO: G = 1) in ONE decode session over P·G rows
     (`sample_groups`): each prompt is prefilled once and its cache copied to its G rows, then every row
     decodes together, with no per-row Python work per step. The same samples as `lmstack.generate` on the
     P·G repeated prompts with the same seed (tested), in about half its time here: generation stays a
     minority of the step;
  3. the samples scored: reward functions (a raising or NaN function drops the sample, counted) or a
     reward model on prompt + completion;
  4. the method's preparation (GRPOPreparation / PPOPreparation): log-probabilities under the reference,
     under the sampling policy (only when the rollout feeds more than one update; otherwise the objective
     uses the current ones, detached, exactly as trl does), values and advantages.

The rollout's rows are then served as `minibatches` optimizer steps per epoch (shuffled per epoch after
the first), each split into `grad_accum` micro-batches. Shapes: N = P·G rows, T tokens (prompt + completion,
right-padded; targets mark the completion).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmstack.align.rewards import RewardFn, RewardStats, score_samples
from lmstack.data.preference import IGNORE_INDEX, PromptRecord
from lmstack.errors import ConfigError
from lmstack.generate.config import GenerationConfig
from lmstack.generate.sampling import next_tokens
from lmstack.generate.session import DecodeSession, cache_length
from lmstack.model.heads import ValueHeadModel
from lmstack.model.protocol import model_device
from lmstack.tokenizer import Tokenizer
from lmstack.train.objectives.grpo import GRPOConfig, group_advantages
from lmstack.train.objectives.logprobs import token_logprobs
from lmstack.train.objectives.ppo import (AdaptiveKLController, PPOConfig, explained_variance, gae, kl_estimate,
                                          masked_whiten, token_rewards)
from lmstack.train.reference import Reference

Batch = dict[str, Any]


@dataclass
class RolloutConfig:
    """The `rollout:` section of an alignment config."""

    prompts_per_rollout: int = 8  # P: prompts per rollout (GRPO samples G of each)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    epochs: int = 1  # optimizer passes over each rollout (PPO: 4)
    minibatches: int = 1  # optimizer steps per pass
    compile: bool = False  # torch.compile the decode step (pays off for long generations on a GPU)

    def __post_init__(self) -> None:
        for name in ("prompts_per_rollout", "max_new_tokens", "epochs", "minibatches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"rollout.temperature must be > 0: on-policy training samples (got {self.temperature})")

    @property
    def steps_per_rollout(self) -> int:
        return self.epochs * self.minibatches


# ------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_groups(policy: nn.Module, prompts: Sequence[list[int]], group_size: int, cfg: RolloutConfig, seed: int,
                  eos_ids: Sequence[int]) -> list[list[int]]:
    """G = group_size sampled completions of each prompt, grouped: completion i·G + j is prompt i's j-th.

    One DecodeSession of P·G rows: the P prompts are prefilled once (rows 0..P-1) and each one's cache and
    last-token logits are copied to its G rows (`reorder`), so a group's prompt is read once, not G times.
    Then one token per row per step, chosen by lmstack.generate's own selection (`next_tokens`: temperature,
    top-k, top-p) from ONE generator seeded with `seed`, exactly as `generate` draws for a batch of P·G
    repeated prompts; the only host sync per step is the "all finished?" test. A completion ends with its
    EOS (kept: the policy learns to stop), at max_new_tokens, or when its row of the cache is full.
    Shapes: P prompts, R = P·G rows, S slots, V vocabulary, N = max_new_tokens."""
    P, G, N = len(prompts), group_size, cfg.max_new_tokens
    R = P * G
    device = model_device(policy)
    config = GenerationConfig(max_new_tokens=N, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                              seed=seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    S = cache_length(max(map(len, prompts)), N, policy.config.max_seq_len, cfg.compile)
    fan_out = torch.arange(P, device=device).repeat_interleave(G)  # (R,) row -> its prompt
    room = (S - torch.tensor([len(p) for p in prompts], device=device)).clamp(max=N)[fan_out]  # (R,) tokens that fit
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    tokens = torch.zeros(R, N, dtype=torch.long, device=device)  # (R, N)
    done = torch.zeros(R, dtype=torch.bool, device=device)
    with DecodeSession(policy, R, S, cfg.compile) as session:
        logits = session.prefill(prompts, list(range(P)))  # (P, V)
        session.reorder(fan_out)  # rows 0..P-1 -> their G copies each (the running flags too)
        logits = logits.index_select(0, fan_out)  # (R, V)
        steps = 0
        for t in range(N):
            chosen = next_tokens(logits, config, None, generator)  # (R,)
            tokens[:, t] = chosen
            steps = t + 1
            done |= torch.isin(chosen, eos) | (room <= steps)
            if steps == N or bool(done.all()):
                break
            logits = session.decode(chosen)  # finished rows decode too (static shapes); their tokens are cut below
    completions = []
    for row, limit in zip(tokens[:, :steps].tolist(), room.tolist()):
        row = row[:max(limit, 0)]
        end = next((i for i, x in enumerate(row) if x in eos_ids), None)
        completions.append(row if end is None else row[:end + 1])
    return completions


# ------------------------------------------------------------------------------------------- scoring
class Scorer(Protocol):
    def __call__(self, records: Sequence[PromptRecord], prompts: Sequence[str], completions: Sequence[str],
                 rows: Sequence[list[int]], device: torch.device) -> list[float]:
        """One reward per sample (NaN: dropped)."""
        ...


class FunctionScorer:
    """Reward functions (lmstack.align.rewards), weighted and summed; failures dropped and counted in `stats`."""

    def __init__(self, fns: Sequence[RewardFn], weights: Sequence[float] | None = None,
                 names: Sequence[str] | None = None):
        if not fns:
            raise ConfigError("no reward function given: set grpo.reward_fns / ppo.reward_fns (or ppo.reward_model)")
        self.fns, self.weights, self.names, self.stats = list(fns), weights, names, RewardStats()

    def __call__(self, records, prompts, completions, rows, device) -> list[float]:
        return score_samples(self.fns, self.weights, prompts, completions, [r.fields for r in records], self.stats,
                             self.names)


class ModelScorer:
    """A reward model (lmstack.model.heads.ScoreModel) reading prompt + completion, in chunks, without gradient."""

    def __init__(self, reward_model: nn.Module, pad_id: int, chunk: int = 16):
        self.model, self.pad_id, self.chunk = reward_model.eval().requires_grad_(False), pad_id, chunk
        self.stats = RewardStats()

    @torch.no_grad()
    def __call__(self, records, prompts, completions, rows, device) -> list[float]:
        if model_device(self.model) != device:
            self.model.to(device)
        scores = []
        for start in range(0, len(rows), self.chunk):
            ids, mask = _pad([list(r) for r in rows[start:start + self.chunk]], self.pad_id)
            scores += self.model(ids.to(device), mask.to(device)).tolist()
        self.stats.scored += len(scores)
        return scores


def _pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


def _chunked(fn: Callable[..., Any], batch: Batch, chunk: int, device: torch.device) -> list[Any]:
    """Apply fn(ids, mask, targets) to the rollout's rows in chunks on `device`; results on the CPU."""
    out = []
    for start in range(0, batch["input_ids"].shape[0], chunk):
        part = [batch[k][start:start + chunk].to(device) for k in ("input_ids", "attention_mask", "targets")]
        result = fn(*part)
        out.append(tuple(r.cpu() if r is not None else None for r in result) if isinstance(result, tuple)
                   else result.cpu())
    return out


# ------------------------------------------------------------------------------------------- preparations
class GRPOPreparation:
    """Group advantages, reference log-probabilities (β > 0) and sampling-policy log-probabilities (reuse)."""

    def __init__(self, cfg: GRPOConfig, reference: Reference | None, reuse: bool, chunk: int):
        if cfg.beta > 0 and reference is None:
            raise ConfigError("grpo.beta > 0 needs a reference model")
        self.cfg, self.reference, self.reuse, self.chunk = cfg, reference, reuse, chunk
        self.group_size = cfg.group_size

    @torch.no_grad()
    def __call__(self, model: nn.Module, batch: Batch, rewards: torch.Tensor, device: torch.device) -> dict[str, float]:
        batch["advantages"] = group_advantages(rewards, self.cfg.group_size, self.cfg.advantage)
        if self.cfg.beta > 0:
            parts = _chunked(lambda *x: self.reference.token_logprobs(model, *x), batch, self.chunk, device)
            batch["ref_logprobs"] = torch.cat(parts)
        if self.reuse:
            parts = _chunked(lambda *x: token_logprobs(model, *x)[0], batch, self.chunk, device)
            batch["old_logprobs"] = torch.cat(parts)
        grouped = rewards.view(-1, self.cfg.group_size)
        spread = torch.nanmean((grouped - torch.nanmean(grouped, 1, keepdim=True)).abs(), 1)
        return {"zero_signal_groups": float((torch.nan_to_num(spread) == 0).float().mean())}


class PPOPreparation:
    """Old log-probabilities and values, the reference's log-probabilities, KL-penalised token rewards, GAE."""

    def __init__(self, cfg: PPOConfig, reference: Reference, chunk: int):
        self.cfg, self.reference, self.chunk = cfg, reference, chunk
        self.kl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.group_size = 1

    @torch.no_grad()
    def __call__(self, model: nn.Module, batch: Batch, scores: torch.Tensor, device: torch.device) -> dict[str, float]:
        if not isinstance(model, ValueHeadModel):
            raise ConfigError("PPO trains a ValueHeadModel (a policy with a value head)")
        parts = _chunked(lambda *x: model(*x, with_entropy=False), batch, self.chunk, device)
        old_logp, values = torch.cat([p[0] for p in parts]), torch.cat([p[2] for p in parts])
        ref_logp = torch.cat(_chunked(lambda *x: self.reference.token_logprobs(model.policy, *x), batch, self.chunk,
                                      device))
        mask = (batch["targets"] != IGNORE_INDEX).to(old_logp.dtype)
        kl = kl_estimate(old_logp, ref_logp, self.cfg.kl_estimator) * mask
        kl_coef = self.kl.value
        rewards = token_rewards(torch.nan_to_num(scores, nan=0.0), kl, mask, kl_coef)
        advantages, returns = gae(rewards, values * mask, mask, self.cfg.gamma, self.cfg.lam)
        if self.cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        batch.update(old_logprobs=old_logp, old_values=values * mask, advantages=advantages, returns=returns)
        valid = mask.sum(-1) > 0
        kl_per_sequence = float(kl.sum(-1)[valid].mean()) if valid.any() else 0.0
        if self.cfg.adaptive_kl:
            self.kl.update(kl_per_sequence, int(valid.sum()))
        return {"kl_per_sequence": kl_per_sequence, "kl_coef": kl_coef,
                "value_explained_variance": explained_variance(values, returns, mask)}


# ------------------------------------------------------------------------------------------- the source
class RolloutSource:
    """On-policy micro-batches: see the module docstring. `prepare` is a GRPOPreparation or PPOPreparation."""

    needs_model = True

    def __init__(self, records: Sequence[PromptRecord], prompt_ids: Sequence[list[int]], tokenizer: Tokenizer,
                 cfg: RolloutConfig, scorer: Scorer, prepare: GRPOPreparation | PPOPreparation,
                 grad_accum: int = 1, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not records:
            raise ConfigError("no prompts to sample from (see the counts above)")
        self.records, self.prompt_ids, self.tokenizer = list(records), [list(p) for p in prompt_ids], tokenizer
        self.cfg, self.scorer, self.prepare = cfg, scorer, prepare
        self.group = prepare.group_size
        self.rows = cfg.prompts_per_rollout * self.group
        if self.rows % cfg.minibatches or (self.rows // cfg.minibatches) % grad_accum:
            raise ConfigError(f"a rollout of {self.rows} samples ({cfg.prompts_per_rollout} prompts x {self.group}) "
                              f"must split into rollout.minibatches={cfg.minibatches} x train.grad_accum={grad_accum}")
        self.grad_accum = grad_accum
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        mean_prompt = float(np.mean([len(p) for p in self.prompt_ids]))
        self.tokens_per_step = int(self.rows * world_size * (mean_prompt + cfg.max_new_tokens / 2)
                                   * cfg.epochs / cfg.steps_per_rollout)
        self._cycle, self._rollout = None, None
        self._next_step, self._restored = 0, None
        self.totals = {"rollouts": 0, "samples": 0, "dropped": 0, "generate_s": 0.0, "rollout_s": 0.0}
        self.last_samples: list[dict[str, Any]] = []

    def state_dict(self, step: int) -> dict[str, Any]:
        return {"next_step": step, "seed": self.seed, "rollout": step // self.cfg.steps_per_rollout,
                "steps_per_rollout": self.cfg.steps_per_rollout}

    # --------------------------------------------------------------- one rollout
    def _prompt_text(self, record: PromptRecord) -> str:
        if isinstance(record.prompt, str):
            return record.prompt
        users = [m["content"] for m in record.prompt if m["role"] == "user"]
        return users[-1] if users else ""

    def make_rollout(self, cycle: int, model: nn.Module) -> Batch:
        """Sample, score and prepare rollout `cycle` with `model` (the policy, or a ValueHeadModel)."""
        started = time.perf_counter()
        rng = np.random.default_rng([self.seed, cycle, self.rank])
        P = self.cfg.prompts_per_rollout
        chosen = rng.choice(len(self.records), P, replace=P > len(self.records)).tolist()
        prompts = [self.prompt_ids[i] for i in chosen for _ in range(self.group)]  # grouped: G copies in a row
        records = [self.records[i] for i in chosen for _ in range(self.group)]
        policy = model.policy if isinstance(model, ValueHeadModel) else model
        device = model_device(model)
        t0 = time.perf_counter()
        sampled = sample_groups(policy, [self.prompt_ids[i] for i in chosen], self.group, self.cfg,
                                int(rng.integers(2**31)), self._eos_ids(policy))
        generate_s = time.perf_counter() - t0
        completions = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in sampled]
        rows = [p + c for p, c in zip(prompts, sampled)]
        rewards = torch.tensor(self.scorer(records, [self._prompt_text(r) for r in records], completions, rows,
                                           device), dtype=torch.float32)
        batch = self._tensors(prompts, sampled, rewards)
        stats = self.prepare(model, batch, rewards, device)
        valid = ~torch.isnan(rewards)
        lengths = torch.tensor([len(c) for c in sampled], dtype=torch.float32)
        stats.update(reward=float(rewards[valid].mean()) if valid.any() else 0.0,
                     dropped_fraction=float((~valid).float().mean()), completion_tokens=float(lengths.mean()),
                     generation_s=generate_s, rollout_s=time.perf_counter() - started)
        batch["stats"] = {k: torch.tensor(v, dtype=torch.float32) for k, v in stats.items()}
        self.totals["rollouts"] += 1
        self.totals["samples"] += len(rows)
        self.totals["dropped"] += int((~valid).sum())
        self.totals["generate_s"] += generate_s
        self.totals["rollout_s"] += stats["rollout_s"]
        self.last_samples = [{"prompt": self._prompt_text(r), "completion": c, "reward": float(x)}
                             for r, c, x in zip(records[:: self.group], completions[:: self.group], rewards[:: self.group])]
        return batch

    def _eos_ids(self, policy: nn.Module) -> list[int]:
        ids = set(policy.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def _tensors(self, prompts: list[list[int]], completions: list[list[int]], rewards: torch.Tensor) -> Batch:
        """Right-padded rows (N, T) with targets on the completion; a dropped sample (NaN reward) scores nothing."""
        rows = [p + c for p, c in zip(prompts, completions)]
        ids, mask = _pad(rows, self.pad_id)
        targets = torch.full_like(ids, IGNORE_INDEX)
        for i, (p, row) in enumerate(zip(prompts, rows)):
            if not math.isnan(rewards[i]) and len(row) > len(p):
                targets[i, len(p) - 1:len(row) - 1] = ids[i, len(p):len(row)]
        return {"input_ids": ids, "attention_mask": mask, "targets": targets}

    # --------------------------------------------------------------- serving it
    def micro_batches(self, step: int, model: nn.Module) -> list[Batch]:
        cycle, k = divmod(step, self.cfg.steps_per_rollout)
        if cycle != self._cycle:
            restored = self._restored is not None and self._restored[0] == cycle
            self._rollout = self._restored[1] if restored else self.make_rollout(cycle, model)
            self._cycle, self._restored = cycle, None
        self._next_step = step + 1
        epoch, minibatch = divmod(k, self.cfg.minibatches)
        N = self._rollout["input_ids"].shape[0]
        order = (np.arange(N) if epoch == 0 else
                 np.random.default_rng([self.seed, cycle, self.rank, epoch]).permutation(N))
        size = N // self.cfg.minibatches
        rows = order[minibatch * size:(minibatch + 1) * size]
        per_micro = size // self.grad_accum
        stats = dict(self._rollout["stats"])
        if k:  # the generation time belongs to the rollout's first step
            stats["generation_s"] = stats["rollout_s"] = torch.tensor(0.0)
        return [self._slice(rows[i:i + per_micro], stats) for i in range(0, size, per_micro)]

    # --------------------------------------------------------------- checkpoints inside a rollout
    def pending_rollout(self) -> tuple[int, Batch] | None:
        """(index, rollout) when the next step still trains on the current rollout: a checkpoint taken there
        must keep it, since regenerating it from the updated policy would give other samples. None at a
        rollout boundary, and with several processes (each rank has its own rollout; rank 0 writes alone)."""
        if self._rollout is None or self.world_size > 1 or self._next_step % self.cfg.steps_per_rollout == 0:
            return None
        return self._cycle, self._rollout

    def restore_rollout(self, cycle: int, rollout: Batch) -> None:
        """Serve `rollout` (from a checkpoint) as rollout `cycle` instead of sampling it again."""
        self._restored = (cycle, rollout)

    def _slice(self, rows: np.ndarray, stats: dict[str, torch.Tensor]) -> Batch:
        index = torch.as_tensor(rows, dtype=torch.long)
        T = int(self._rollout["attention_mask"][index].sum(-1).max())  # trim the columns that are padding here
        out = {k: v[index][:, :T] if v.dim() == 2 else v[index]
               for k, v in self._rollout.items() if isinstance(v, torch.Tensor)}
        out["stats"] = stats
        return out


ROLLOUT_FILE = "rollout.safetensors"


@dataclass
class RolloutCheckpointStore:
    """A checkpoint store (any ModelStore) that also keeps the pending rollout of a checkpoint taken inside
    one (`ROLLOUT_FILE`: its tensors, `stats.*`, the rollout index in the metadata) and hands it back to the
    source on resume."""

    inner: Any
    source: RolloutSource

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.inner.state(model)

    def write(self, model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
        self.inner.write(model, state, directory)
        pending = self.source.pending_rollout()
        if pending is None:
            return
        cycle, rollout = pending
        tensors = {k: v for k, v in rollout.items() if isinstance(v, torch.Tensor)}
        tensors.update({f"stats.{k}": v for k, v in rollout["stats"].items()})
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, directory / ROLLOUT_FILE,
                  metadata={"format": "pt", "rollout": str(cycle)})

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        return self.inner.read(directory)

    def load_into(self, model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
        self.inner.load_into(model, state, directory)
        file = Path(directory) / ROLLOUT_FILE
        if not file.exists():
            return
        with safe_open(file, framework="pt") as f:
            cycle = int(f.metadata()["rollout"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        rollout: Batch = {k: v for k, v in tensors.items() if not k.startswith("stats.")}
        rollout["stats"] = {k[len("stats."):]: v for k, v in tensors.items() if k.startswith("stats.")}
        self.source.restore_rollout(cycle, rollout)


__all__ = ["FunctionScorer", "GRPOPreparation", "ModelScorer", "PPOPreparation", "ROLLOUT_FILE", "RolloutCheckpointStore",
           "RolloutConfig", "RolloutSource", "sample_groups"]
