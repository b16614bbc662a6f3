"""The alignment recipe: AlignConfig -> an Engine for a reward model, the DPO family, PPO, GRPO or RLOO.

    engine, parts = build(cfg)          # or run(cfg): build, fit, publish OUT/model, write OUT/summary.json

    method  model trained                 objective            batches
    rm      ScoreModel (from the SFT LM)  RewardObjective      preference pairs
    dpo     the policy                    PreferenceObjective  preference pairs (KTO: unpaired examples)
    ppo     ValueHeadModel(policy)        PPOObjective         RolloutSource + PPOPreparation (reward model or functions)
    grpo    the policy                    GRPOObjective        RolloutSource + GRPOPreparation (reward functions)
    rloo    the policy                    GRPOObjective        the same, with leave-one-out advantages

The reference (DPO, KTO, PPO, GRPO with beta > 0) is a frozen copy of the starting model, or `reference:
DIR`; with `lora:` the policy trains a LoRA adapter (lmstack.adapters) and its reference is the same weights
with the adapter switched off (no second copy). With `dpo.precompute_reference` its sequence
log-probabilities are computed once, cached in OUT/reference_logps.safetensors, and the reference is not
kept in memory. `adapter: DIR` starts from an SFT adapter on `model`, merged in first (so the reference is
the SFT model). Checkpoints: the policy as a Hugging Face directory, or with `lora:` a peft adapter directory
(PPO: plus value_head.safetensors), the reward model as a sequence-classification directory. OUT/model is the
final model (LoRA: merged; the adapter alone in OUT/adapter); OUT/summary.json the held-out figures and the
rollout totals.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from lmstack.adapters import AdapterStore, LoraConfig, apply_lora, save_adapter, unload
from lmstack.align.reward_adapter import ScoreAdapterStore, apply_reward_lora, merged_score_model, save_score_adapter
from lmstack.align.rewards import resolve_reward_fn
from lmstack.align.tasks import arithmetic_problems, sorted_letters_pairs
from lmstack.atomic import write_text
from lmstack.data.preference import (ExampleBatches, PromptRecord, Renderer, collate_pairs, collate_unpaired,
                                     fixed_batches, read_pairs, read_prompts, read_unpaired, split_holdout)
from lmstack.device import resolve_device
from lmstack.errors import ConfigError
from lmstack.interop.hf import load_model, read_config, save_model
from lmstack.interop.hf_heads import (is_score_model_dir, load_score_model, read_score_state, save_score_model,
                                      score_model_from_lm, write_score_weights)
from lmstack.model.heads import ScoreModel, ValueHeadModel
from lmstack.model.protocol import model_device
from lmstack.schema import to_dict
from lmstack.tokenizer import Tokenizer
from lmstack.train.checkpoint import WholeModel, _load_or_explain, begin_run
from lmstack.train.config import OptimConfig, ScheduleConfig, TrainConfig
from lmstack.train.distributed import DistContext, full_model_state, init_distributed, shutdown_distributed
from lmstack.train.engine import Engine, TrainResult, to_device
from lmstack.train.objectives.dpo import PreferenceConfig, PreferenceObjective
from lmstack.train.objectives.grpo import GRPOConfig, GRPOObjective
from lmstack.train.objectives.ppo import PPOConfig, PPOObjective
from lmstack.train.objectives.reward import RewardConfig, RewardObjective
from lmstack.train.reference import (AdapterDisabledReference, FrozenReference, cached_reference_logps,
                                     compute_sequence_logps, fingerprint, reference_identity)
from lmstack.train.rollout import (FunctionScorer, GRPOPreparation, ModelScorer, PPOPreparation,
                                   RolloutCheckpointStore, RolloutConfig, RolloutSource)

Method = Literal["rm", "dpo", "ppo", "grpo", "rloo"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
BUILTIN_TASKS = ("arithmetic", "sorted_letters")


@dataclass
class AlignDataConfig:
    path: str = ""  # JSONL: pairs (rm, dpo), unpaired or pairs (kto), prompts (ppo, grpo, rloo)
    task: str | None = None  # instead of a file, a built-in synthetic task: arithmetic | sorted_letters
    task_size: int = 2000  # records the built-in task generates
    prompt_field: str = "prompt"  # the prompt's key in prompt records (e.g. "question" for GSM8K)
    format: Literal["auto", "chat", "text"] = "auto"  # auto: the chat template when the tokenizer has one
    max_len: int | None = None  # tokens per sequence, prompt + completion; null = the model's max_seq_len
    val_fraction: float = 0.05  # pairs held out for the held-out figures (rm, dpo)
    limit: int | None = None  # use at most this many records


@dataclass
class AlignConfig:
    """`lmstack align METHOD --config X.yaml`: everything an alignment run needs."""

    method: Method = "dpo"
    model: str = ""  # the starting model: an SFT model directory (rm: a causal LM or a reward model)
    tokenizer: str | None = None  # a tokenizer directory; null = the model's
    reference: str | None = None  # the reference model directory; null = the starting model, frozen
    adapter: str | None = None  # an SFT adapter (peft directory) on `model`, merged into it before training
    lora: LoraConfig | None = None  # train a LoRA adapter (dpo, ppo, grpo, rloo: the reference is adapter off; rm:
    # the body's adapter plus the score head, saved as a peft SEQ_CLS adapter)
    out_dir: str = "runs/align"
    data: AlignDataConfig = field(default_factory=AlignDataConfig)
    rm: RewardConfig = field(default_factory=RewardConfig)
    dpo: PreferenceConfig = field(default_factory=PreferenceConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, weight_decay=0.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(kind="constant"))
    # train.batch_size: pairs per micro-batch (rm, dpo); for rollouts, the rows of each no-grad forward (reference,
    # old log-probabilities), a micro-batch being the rollout / (rollout.minibatches x train.grad_accum)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100, batch_size=8, eval_every=0))


@dataclass
class AlignParts:
    """What build() made besides the engine: for the summary, the benchmarks and the tests."""

    cfg: AlignConfig
    tokenizer: Tokenizer
    model: nn.Module
    counts: dict[str, Any]
    val_batches: list[dict[str, torch.Tensor]] | None = None
    objective: Any = None
    source: RolloutSource | None = None


# ------------------------------------------------------------------------------------------- what a checkpoint holds
def _tokenizer_files(directory: Path) -> dict[str, Path]:
    return {name: directory / name for name in TOKENIZER_FILES if (directory / name).is_file()}


@dataclass
class ScoreModelStore:
    """A reward model checkpoint: a Hugging Face sequence-classification directory (+ the tokenizer)."""

    extra_files: dict[str, Path] = field(default_factory=dict)

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return full_model_state(model)

    def write(self, model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
        write_score_weights(model, directory, state)
        for name, source in self.extra_files.items():
            shutil.copyfile(source, directory / name)

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        return read_score_state(directory)[1]

    def load_into(self, model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
        _load_or_explain(model, state, directory, strict=True)


VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class PolicyValueStore:
    """A PPO checkpoint: the policy as `policy_store` writes it (a Hugging Face model directory, or with LoRA
    a peft adapter directory), the value head beside it."""

    extra_files: dict[str, Path] = field(default_factory=dict)
    policy_store: Any = None  # None: WholeModel(extra_files)

    def _policy(self) -> Any:
        return self.policy_store or WholeModel(self.extra_files)

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.policy_store is None:
            return full_model_state(model)
        head = {"value_head." + k: v.detach().cpu().clone() for k, v in model.value_head.state_dict().items()}
        return {**{"policy." + k: v for k, v in self.policy_store.state(model.policy).items()}, **head}

    def write(self, model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
        policy = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
        self._policy().write(model.policy, policy, directory)
        save_file({k: v.contiguous() for k, v in state.items() if k.startswith("value_head.")},
                  directory / VALUE_HEAD_FILE, metadata={"format": "pt"})

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        state = {"policy." + k: v for k, v in self._policy().read(directory).items()}
        return {**state, **load_file(directory / VALUE_HEAD_FILE)}

    def load_into(self, model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
        if self.policy_store is None:
            _load_or_explain(model, state, directory, strict=True)
            return
        policy = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
        self.policy_store.load_into(model.policy, policy, directory)
        head = {k.removeprefix("value_head."): v for k, v in state.items() if k.startswith("value_head.")}
        model.value_head.load_state_dict(head)


# ------------------------------------------------------------------------------------------- data
def _write_task(cfg: AlignConfig, out_dir: Path) -> Path:
    """A built-in task's records as JSONL in OUT (so the run's data is on disk and in the checkpoint's config)."""
    size, seed = cfg.data.task_size, cfg.train.seed
    if cfg.data.task == "arithmetic":
        records = arithmetic_problems(size, seed)
    elif cfg.data.task == "sorted_letters":
        records = sorted_letters_pairs(size, seed)
    else:
        raise ConfigError(f"data.task: unknown task {cfg.data.task!r} (built in: {', '.join(BUILTIN_TASKS)})")
    path = out_dir / f"task-{cfg.data.task}.jsonl"
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


def _data_path(cfg: AlignConfig, out_dir: Path) -> Path:
    if cfg.data.task is not None:
        return _write_task(cfg, out_dir)
    if not cfg.data.path:
        raise ConfigError("data.path is required (a JSONL file), or data.task for a built-in task")
    return Path(cfg.data.path)


def _say(message: str) -> None:
    print(f"lmstack align: {message}", file=sys.stderr)


def _pairs(cfg: AlignConfig, renderer: Renderer, path: Path, counts: dict[str, Any]) -> tuple[list, list]:
    """Encoded training and held-out examples (pairs, or unpaired examples for KTO). The held-out records are
    chosen before rendering (split_holdout(records, data.val_fraction, train.seed)), so a benchmark can
    reproduce the split, e.g. to keep held-out dialogues out of a model's pretraining."""
    kto = cfg.method == "dpo" and cfg.dpo.loss == "kto"
    records = read_unpaired(path) if kto else read_pairs(path)
    records = records[:cfg.data.limit] if cfg.data.limit else records
    train_records, held_records = split_holdout(records, cfg.data.val_fraction, cfg.train.seed)
    encode = renderer.encode_unpaired if kto else renderer.encode_pairs
    train, stats = encode(train_records)
    held, held_stats = encode(held_records, first_index=len(train))
    counts["data"] = stats.to_dict()
    counts.update(train_examples=len(train), heldout_examples=len(held), heldout_data=held_stats.to_dict())
    _say(f"{path}: training {stats.summary()}; held out {held_stats.summary()}")
    return train, held


def _prompts(cfg: AlignConfig, renderer: Renderer, path: Path, counts: dict[str, Any]
             ) -> tuple[list[PromptRecord], list[list[int]]]:
    records = read_prompts(path, cfg.data.prompt_field)
    records = records[:cfg.data.limit] if cfg.data.limit else records
    kept, ids, too_long = [], [], 0
    for record in records:
        prompt = renderer.prompt_ids(record.prompt)
        if len(prompt) + 1 > renderer.max_len:
            too_long += 1
            continue
        kept.append(record)
        ids.append(prompt)
    counts.update(prompts=len(kept), prompts_too_long=too_long)
    _say(f"{path}: {len(kept)} prompts" + (f"; {too_long} skipped: longer than max_len" if too_long else ""))
    return kept, ids


# ------------------------------------------------------------------------------------------- the methods
def _policy(cfg: AlignConfig) -> nn.Module:
    """The starting model (an SFT adapter merged in), with a fresh LoRA adapter when `lora:` is set."""
    if cfg.adapter is None:
        policy = load_model(cfg.model)
    else:  # merged so that the reference (the adapter-disabled policy, or its frozen copy) is the SFT model
        policy = unload(load_model(cfg.model, adapter=cfg.adapter))
        policy.requires_grad_(True)
    if cfg.lora is not None:
        apply_lora(policy, cfg.lora)  # freezes everything but the adapter
    return policy


def _reference(cfg: AlignConfig, policy: nn.Module) -> FrozenReference | AdapterDisabledReference:
    if cfg.reference:
        return FrozenReference(load_model(cfg.reference))
    if cfg.lora is not None:
        return AdapterDisabledReference()
    return FrozenReference(policy)


def _base_name(cfg: AlignConfig) -> str:
    return str(Path(cfg.model).resolve()) if Path(cfg.model).is_dir() else cfg.model


def _policy_store(cfg: AlignConfig, extra: dict[str, Path]) -> WholeModel | AdapterStore:
    if cfg.lora is None:
        return WholeModel(extra)
    return AdapterStore(base_model_name_or_path=_base_name(cfg), extra_files=extra)


def _preference_parts(cfg: AlignConfig, renderer: Renderer, path: Path, out_dir: Path, counts: dict[str, Any],
                      pad: int) -> tuple[nn.Module, Any, ExampleBatches, list, Any]:
    policy = _policy(cfg)
    train, held = _pairs(cfg, renderer, path, counts)
    kto = cfg.dpo.loss == "kto"
    collate = (lambda items: collate_unpaired(items, pad)) if kto else (lambda items: collate_pairs(items, pad))
    reference = _reference(cfg, policy) if cfg.dpo.uses_reference else None
    if cfg.dpo.precompute_reference and reference is not None:
        if kto:
            raise ConfigError("dpo.precompute_reference is not available for kto: its KL rows pair each prompt with "
                              "another example's completion, and those pairings change with the shuffle")
        everything = sorted(train + held, key=lambda e: e.index)
        identity = reference_identity(cfg.reference or cfg.model)
        if cfg.adapter and not cfg.reference:  # the reference is the model with the SFT adapter merged in
            identity += reference_identity(cfg.adapter)
        key = fingerprint(everything, identity)
        device = resolve_device(cfg.train.device)
        if cfg.lora is not None:
            policy.to(device)
        logps = cached_reference_logps(out_dir / "reference_logps.safetensors", key, lambda: compute_sequence_logps(
            reference, fixed_batches(everything, collate, cfg.train.batch_size), device, policy))
        reference, collate = None, _with_reference_logps(collate, logps)  # the reference leaves memory
    objective = PreferenceObjective(cfg.dpo, reference)
    return policy, objective, train, held, collate


def _with_reference_logps(collate: Any, logps: torch.Tensor) -> Any:
    """The same batches with the cached reference figures of their examples attached ("ref_logps" (B, R))."""
    def collate_cached(items: list) -> dict[str, torch.Tensor]:
        batch = collate(items)
        batch["ref_logps"] = logps[batch["index"]]
        return batch
    return collate_cached


def build(cfg: AlignConfig, resume: bool = False, dist: DistContext | None = None) -> tuple[Engine, AlignParts]:
    """The engine for `cfg` and what went into it; with `resume`, from OUT's latest checkpoint."""
    dist = dist or DistContext()
    out_dir, t = Path(cfg.out_dir), cfg.train
    if not cfg.model:
        raise ConfigError("model is required: the directory of the model to start from (an SFT model)")
    resume_from = begin_run(t, out_dir, resume)
    if cfg.method == "rloo":
        cfg.grpo.advantage = "rloo"
    if cfg.method == "rm" and cfg.adapter is not None:
        raise ConfigError("align rm starts from `model` alone: remove `adapter:` (merge the SFT adapter into a model "
                          "directory first: lmstack.load_model(base, adapter=...) then save_model); `lora:` works")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = Path(cfg.tokenizer or cfg.model)
    tokenizer = Tokenizer.load(tokenizer_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    path = _data_path(cfg, out_dir)
    counts: dict[str, Any] = {}
    extra = _tokenizer_files(tokenizer_dir)
    torch.manual_seed(t.seed)
    val, source = None, None

    if cfg.method in ("rm", "dpo"):
        if cfg.method == "rm":
            model = (load_score_model(cfg.model) if is_score_model_dir(cfg.model)
                     else score_model_from_lm(cfg.model, pad_token_id=pad))
            if cfg.lora is not None:  # adapters on the body, the score head in full (a peft SEQ_CLS adapter)
                apply_reward_lora(model, cfg.lora)
            renderer = Renderer(tokenizer, cfg.data.max_len or model.config.max_seq_len, cfg.data.format)
            train, held = _pairs(cfg, renderer, path, counts)
            objective, collate = RewardObjective(cfg.rm), (lambda items: collate_pairs(items, pad))
            store = ScoreModelStore(extra) if cfg.lora is None else ScoreAdapterStore(_base_name(cfg), extra)
        else:
            max_len = cfg.data.max_len or read_config(cfg.model).max_seq_len
            renderer = Renderer(tokenizer, max_len, cfg.data.format)
            model, objective, train, held, collate = _preference_parts(cfg, renderer, path, out_dir, counts, pad)
            store = _policy_store(cfg, extra)
        batches = ExampleBatches(train, collate, t.batch_size, t.grad_accum, t.seed, dist.rank, dist.world_size)
        val = fixed_batches(held, collate, t.batch_size) if held else None
    else:
        policy = _policy(cfg)
        renderer = Renderer(tokenizer, cfg.data.max_len or policy.config.max_seq_len, cfg.data.format)
        records, prompt_ids = _prompts(cfg, renderer, path, counts)
        chunk = max(1, t.batch_size)
        if cfg.method == "ppo":
            model = ValueHeadModel(policy)
            prepare = PPOPreparation(cfg.ppo, _reference(cfg, policy), chunk)
            scorer = (ModelScorer(load_score_model(cfg.ppo.reward_model), pad, chunk) if cfg.ppo.reward_model
                      else FunctionScorer([resolve_reward_fn(n) for n in cfg.ppo.reward_fns], names=cfg.ppo.reward_fns))
            store = PolicyValueStore(extra, None if cfg.lora is None else _policy_store(cfg, extra))
            objective = PPOObjective(cfg.ppo)
        else:
            model = policy
            reference = _reference(cfg, policy) if cfg.grpo.beta > 0 else None
            prepare = GRPOPreparation(cfg.grpo, reference, cfg.rollout.steps_per_rollout > 1, chunk)
            scorer = FunctionScorer([resolve_reward_fn(n) for n in cfg.grpo.reward_fns], cfg.grpo.reward_weights,
                                    cfg.grpo.reward_fns)
            objective, store = GRPOObjective(cfg.grpo, cfg.rollout.max_new_tokens), _policy_store(cfg, extra)
        batches = source = RolloutSource(records, prompt_ids, tokenizer, cfg.rollout, scorer, prepare, t.grad_accum,
                                         t.seed, dist.rank, dist.world_size)
        store = RolloutCheckpointStore(store, source)  # a checkpoint inside a rollout keeps the rollout

    run_config = to_dict(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    trains = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts.update(parameters=n_params, trainable_parameters=trains)
    if dist.is_main:
        write_text(out_dir / "config.yaml", yaml.safe_dump(run_config, sort_keys=False))
        _say(f"{cfg.method}: {n_params:,} parameters" + (f" ({trains:,} train: LoRA)" if cfg.lora else "") +
             f", {t.steps} steps" +
             (f", resuming from {resume_from}" if resume_from else ""))
    engine = Engine(model, objective, batches, t, cfg.optim, cfg.schedule, out_dir=out_dir, val_batches=val,
                    dist=dist, resume_from=resume_from, store=store, run_config=run_config)
    return engine, AlignParts(cfg, tokenizer, model, counts, val, objective, source)


# ------------------------------------------------------------------------------------------- after training
@torch.no_grad()
def heldout_metrics(objective: Any, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """The objective's metrics over the held-out batches, as means over the scored items (pairs)."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    count, loss = 0.0, 0.0
    for batch in batches:
        out = objective(model, to_device(batch, model_device(model)))
        count += float(out.count)
        loss += float(out.total)
        for k, v in out.metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    model.train(was_training)
    result = {k: v / max(count, 1.0) for k, v in totals.items()}
    result["loss"] = loss / max(count, 1.0)
    if "reward_ties" in result:  # a tie is half right: at the start (policy = reference) every pair ties
        result["reward_accuracy_ties_half"] = result["reward_accuracy"] + 0.5 * result["reward_ties"]
    return result


def publish(engine: Engine, parts: AlignParts) -> Path:
    """OUT/model: the final policy (a Hugging Face causal-LM directory; LoRA: merged into a copy, the adapter
    alone in OUT/adapter) or reward model (sequence classification)."""
    out = Path(parts.cfg.out_dir) / "model"
    model = engine.base_model
    files = {name: p.read_text(encoding="utf-8") for name, p in
             _tokenizer_files(Path(parts.cfg.tokenizer or parts.cfg.model)).items()}
    if out.exists():
        shutil.rmtree(out)
    if isinstance(model, ScoreModel):
        if parts.cfg.lora is not None:  # OUT/adapter: peft SEQ_CLS (adapter + score head); OUT/model: merged
            shutil.rmtree(Path(parts.cfg.out_dir) / "adapter", ignore_errors=True)
            save_score_adapter(model, Path(parts.cfg.out_dir) / "adapter", _base_name(parts.cfg),
                               _tokenizer_files(Path(parts.cfg.tokenizer or parts.cfg.model)))
            model = merged_score_model(model)
        return save_score_model(model, out, files)
    policy = model.policy if isinstance(model, ValueHeadModel) else model
    if parts.cfg.lora is not None:
        adapter = Path(parts.cfg.out_dir) / "adapter"
        if adapter.exists():
            shutil.rmtree(adapter)
        # its base is `model` (with `adapter:`, the SFT adapter merged into it: load that merged model first)
        save_adapter(policy, adapter, base_model_name_or_path=str(Path(parts.cfg.model).resolve()),
                     extra_files=_tokenizer_files(Path(parts.cfg.tokenizer or parts.cfg.model)))
        policy = unload(copy.deepcopy(policy))
    return save_model(policy, out, extra_files=files, dtype=torch.float32)


def run(cfg: AlignConfig, resume: bool = False) -> tuple[TrainResult, dict[str, Any]]:
    """Align per `cfg`: build, fit, publish OUT/model, write OUT/summary.json (held-out figures, rollout totals)."""
    dist = init_distributed(resolve_device(cfg.train.device).type)
    try:
        engine, parts = build(cfg, resume, dist)
        result = engine.fit()
        summary: dict[str, Any] = {"method": cfg.method, "steps": result.steps, "train_loss": result.final_loss,
                                   "wall_s": round(result.wall_s, 1), **parts.counts}
        if parts.val_batches:
            summary["heldout"] = heldout_metrics(parts.objective, engine.base_model, parts.val_batches)
        if parts.source is not None:
            totals = dict(parts.source.totals)
            totals["generation_time_fraction"] = totals["generate_s"] / result.wall_s if result.wall_s else None
            scorer_stats = parts.source.scorer.stats
            totals["reward_dropped"] = dict(scorer_stats.dropped)
            totals["reward_first_error"] = dict(scorer_stats.first_error)
            summary["rollouts"] = totals
        if dist.is_main:
            summary["model"] = str(publish(engine, parts))
            write_text(Path(cfg.out_dir) / "summary.json", json.dumps(_finite(summary), indent=2) + "\n")
        return result, summary
    finally:
        shutdown_distributed()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


__all__ = ["AlignConfig", "AlignDataConfig", "AlignParts", "PolicyValueStore", "ScoreModelStore", "build",
           "heldout_metrics", "publish", "run"]
