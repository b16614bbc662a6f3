"""`lmstack quickstart`: from nothing to a chatting model with a report, on the built-in corpus, in minutes.

    lmstack quickstart [--out runs/quickstart] [--minutes 6] [--preset NAME] [--corpus PATH...]

1. data      `lmstack data prepare`: clean, dedup, byte-level BPE tokenizer, token shards, data report
2. model     a small Llama-style model, sized so the run fits the time budget on this machine
3. train     the real engine (`lmstack pretrain`'s code path): progress bar, evaluation, checkpoints
4. samples   a few prompts with greedy, nucleus sampling and beam search side by side
5. report    OUT/report.md with the loss curve, the data report, parameters, tokens/s, perplexity
             before and after, and the samples

OUT is a Hugging Face model directory (config.json, model.safetensors, tokenizer files), so
`lmstack chat --model OUT` and `transformers.AutoModelForCausalLM.from_pretrained(OUT)` open it.
Stages that finished are kept: after a Ctrl-C (which leaves the last checkpoint), running the same
command again resumes instead of starting over.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmstack.atomic import write_text
from lmstack.errors import ConfigError
from lmstack.schema import from_dict, to_dict

# The default model: ~4.5M parameters, a few thousand tokens/s on two CPU cores in fp32.
QUICKSTART_MODEL = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=688,
                        tie_word_embeddings=True, max_seq_len=256)
PROMPTS = ["The return value of", "A dictionary is", "def read_file(path):", "The with statement"]
STRATEGIES = {  # name -> lmstack.generate options
    "greedy": dict(temperature=0.0, repetition_penalty=1.2),
    "top-p 0.9, T=0.8": dict(temperature=0.8, top_p=0.9, seed=0),
    "beam search (4)": dict(num_beams=4, length_penalty=1.0, repetition_penalty=1.2),
}


PROBE_STEPS = 4  # timed on a throwaway engine: the first warms up, the best of the rest sets the pace
EVALUATIONS = 8  # validation passes during training
MIN_STEPS = 20
SAMPLE_AND_REPORT_S = 20.0  # decoding 4 prompts x 3 strategies x 40 tokens, and the report, on 2 cores
CHECKPOINT_S = 0.5


@dataclass
class QuickstartPlan:
    """What a run was started with; stored in OUT/quickstart.json so a rerun resumes the same run."""

    corpus: list[str] = field(default_factory=lambda: ["builtin:python-docs"])
    vocab_size: int = 4096
    model: dict = field(default_factory=lambda: dict(QUICKSTART_MODEL))
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 0  # chosen from a timing of the first steps so that the whole run fits `minutes`
    minutes: float = 8.0
    seed: int = 0
    lr: float = 2e-3


def say(message: str) -> None:
    print(f"lmstack quickstart: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- stages
def prepare_data(plan: QuickstartPlan, data_dir: Path) -> dict:
    """Stage 1+2: the data pipeline with a BPE tokenizer trained on the cleaned text (skipped if done).

    Validation text is held-out documents spread over the corpus (every 20th kept document), as
    `lmstack data prepare` splits by default. A corpus of too few documents for that (one big file)
    is split by its token stream's last 5% instead.
    """
    report_path = data_dir / "data_report.json"
    if report_path.exists():
        say(f"data: already prepared in {data_dir}")
        return json.loads(report_path.read_text(encoding="utf-8"))
    from lmstack.data.builtin import BUILTIN_QUALITY_DEFAULTS
    from lmstack.data.pipeline import PrepareConfig, prepare

    builtin = [c for c in plan.corpus if c.startswith("builtin:")]
    if builtin and len(plan.corpus) > 1:
        raise ConfigError("--corpus: give either one builtin:NAME or your own files/directories, not both")
    quality = dict(BUILTIN_QUALITY_DEFAULTS.get(builtin[0].removeprefix("builtin:"), {})) if builtin else {}
    cfg = from_dict(PrepareConfig, {
        "corpus": builtin[0] if builtin else None, "inputs": [] if builtin else list(plan.corpus),
        "train_tokenizer": f"bpe:{plan.vocab_size}", "output": str(data_dir), "val_fraction": 0.05,
        "split": "document", "quality": quality})
    say(f"data: cleaning, deduplicating and tokenising {', '.join(plan.corpus)}")
    report = prepare(cfg)
    if report["split"]["val"]["tokens"] < plan.seq_len + 1:
        say(f"data: {report['split']['val']['documents']} held-out documents are too few to validate on; "
            "using the last 5% of the token stream instead")
        report = prepare(dataclasses.replace(cfg, split="tail", overwrite=True))
    return report


def pretrain_config(plan: QuickstartPlan, out: Path, steps: int | None = None):
    """The PretrainConfig this quickstart trains with: the same recipe and engine as `lmstack pretrain`."""
    from lmstack.train.config import PretrainConfig

    steps = max(steps or plan.steps, 1)
    return from_dict(PretrainConfig, {
        "out_dir": str(out / "run"),
        "model": plan.model,
        "data": {"path": str(out / "data")},
        "optim": {"lr": plan.lr, "betas": [0.9, 0.95], "weight_decay": 0.1},
        "schedule": {"kind": "cosine", "warmup_steps": max(1, min(100, steps // 10)), "min_lr": plan.lr / 10},
        "train": {"steps": steps, "batch_size": plan.batch_size, "seq_len": plan.seq_len, "seed": plan.seed,
                  "eval_every": max(1, steps // EVALUATIONS), "eval_windows": 64,
                  "checkpoint_every": max(1, steps // 10), "keep_last": 1},
    })


@dataclass
class Probe:
    """What a throwaway engine measured before training: the run's starting point and its costs here."""

    val_loss: float  # of the initial weights (the same seed as the run's)
    step_s: float  # one optimizer step (best of the timed steps after the first)
    eval_s: float  # one pass over the validation batches
    parameters: int
    model_config: object


def probe(plan: QuickstartPlan, out: Path) -> Probe:
    """Build the run's engine without an output directory, evaluate the initial weights and time a few real
    steps (clipping, schedule and all); the engine is thrown away, so the real run starts from step 0."""
    from lmstack.train.engine import Engine
    from lmstack.train.recipes.pretrain import build_parts, objective

    cfg = pretrain_config(plan, out, steps=PROBE_STEPS)
    model, batches, val = build_parts(cfg)
    cfg.train.progress = False
    engine = Engine(model, objective, batches, cfg.train, cfg.optim, cfg.schedule, val_batches=val)
    t0 = time.perf_counter()
    val_loss = engine.evaluate()
    eval_s = time.perf_counter() - t0
    times = []
    for step in range(PROBE_STEPS):
        t0 = time.perf_counter()
        engine.train_step(step)
        times.append(time.perf_counter() - t0)
    return Probe(val_loss, min(times[1:]), eval_s, model.num_parameters(), model.config)  # step 0 warms up


def steps_that_fit(plan: QuickstartPlan, measured: Probe, seconds_left: float) -> int:
    """Training steps that fit the seconds left of the budget, after the evaluations during training,
    the checkpoints and the samples and report that follow (estimated from the probe)."""
    reserve = EVALUATIONS * measured.eval_s + SAMPLE_AND_REPORT_S + 10 * CHECKPOINT_S
    return max(MIN_STEPS, int((seconds_left - reserve) / measured.step_s))


def train(plan: QuickstartPlan, out: Path):
    """Stage 3: the pretraining recipe, resuming from OUT/run's latest checkpoint when there is one."""
    from lmstack.train.checkpoint import latest_checkpoint
    from lmstack.train.recipes.pretrain import run

    checkpoint = latest_checkpoint(out / "run" / "checkpoints")
    if checkpoint is not None:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        if state["step"] >= plan.steps:
            say(f"train: already finished ({plan.steps} steps) in {out / 'run'}")
            return None
        say(f"train: resuming from {checkpoint} (step {state['step']} of {plan.steps})")
    return run(pretrain_config(plan, out), resume=checkpoint is not None)


def publish_model(out: Path) -> Path | None:
    """Copy the latest checkpoint's model files into OUT itself, config.json last (it marks a complete model)."""
    from lmstack.train.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(out / "run" / "checkpoints")
    if checkpoint is None:
        return None
    names = sorted(p.name for p in checkpoint.iterdir() if p.is_file() and p.name.startswith(("model", "tokenizer",
                   "special_tokens", "generation_config", "chat_template")))
    for name in [*names, "config.json"]:
        tmp = out / f".{name}.tmp"
        shutil.copyfile(checkpoint / name, tmp)
        os.replace(tmp, out / name)
    return checkpoint


def sample(out: Path) -> dict[str, dict[str, str]]:
    """Stage 4: each prompt under each decoding strategy -> {prompt: {strategy: text}}."""
    import lmstack
    from lmstack.tokenizer import Tokenizer

    model = lmstack.load_model(out).eval()
    tokenizer = Tokenizer.load(out)
    samples: dict[str, dict[str, str]] = {p: {} for p in PROMPTS}
    for name, options in STRATEGIES.items():
        result = lmstack.generate(model, tokenizer, PROMPTS, max_new_tokens=40, **options)
        for prompt, text in zip(PROMPTS, result.texts):
            samples[prompt][name] = text
    return samples


# ------------------------------------------------------------------------------------------- report
def _read_metrics(out: Path) -> list[dict]:
    from lmstack.train.metrics import read_metrics

    return read_metrics(out / "run" / "metrics.jsonl")


def write_report(out: Path, plan: QuickstartPlan, facts: dict, data_report: dict,
                 samples: dict[str, dict[str, str]], interrupted: bool = False) -> Path:
    """Stage 5: OUT/report.md (and OUT/loss.png beside it); `interrupted` marks a run stopped by Ctrl-C."""
    c = facts["model_config"]
    records = _read_metrics(out)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    if (out / "run" / "loss.png").exists():
        shutil.copyfile(out / "run" / "loss.png", out / "loss.png")
    speeds = sorted(r["tokens_per_s"] for r in train)
    tokens_per_s = speeds[len(speeds) // 2] if speeds else float("nan")
    before, after = facts["val_loss_before"], evals[-1]["val_loss"] if evals else float("nan")
    lines = [
        "# lmstack quickstart report", "",
        *(["**Interrupted** during training: the model is the last checkpoint; run the same command again to "
            "resume.", ""] if interrupted else []),
        f"Output directory `{out}` is a Hugging Face model directory: `lmstack chat --model {out}` opens it.", "",
        "| | |", "| --- | ---: |",
        f"| corpus | {', '.join(plan.corpus)} |",
        f"| parameters | {facts['parameters']:,} |",
        f"| model | {c.num_layers} layers, width {c.hidden_size}, {c.num_heads} heads ({c.num_kv_heads} kv), "
        f"vocab {c.vocab_size}, context {c.max_seq_len} |",
        f"| optimizer steps | {train[-1]['step'] if train else 0} of {plan.steps} "
        f"({plan.batch_size} x {plan.seq_len} tokens each) |",
        f"| tokens trained | {train[-1]['tokens'] if train else 0:,} |",
        f"| training tokens/s (median step) | {tokens_per_s:,.0f} |",
        f"| validation loss before / after | {before:.3f} / {after:.3f} |",
        f"| validation perplexity before / after | {math.exp(before):,.1f} / {math.exp(after):,.1f} |",
        f"| wall time: data / train / samples | {facts['data_s']:.0f} s / {facts['train_s']:.0f} s / "
        f"{facts['sample_s']:.0f} s |",
        f"| threads | {torch.get_num_threads()} |", "",
        "## Loss curve", "", "![loss curve](loss.png)", "",
        "## Validation", "", "| step | val loss | perplexity |", "| ---: | ---: | ---: |",
        f"| 0 | {before:.4f} | {math.exp(before):,.1f} |",
        *[f"| {r['step']} | {r['val_loss']:.4f} | {r['val_ppl']:,.1f} |" for r in evals], "",
        *(["## Samples", "",
        f"Each prompt continued for 40 tokens. Strategies: {'; '.join(f'{k}: `{v}`' for k, v in STRATEGIES.items())}.",
        ""] if samples else []),
    ]
    for prompt, by_strategy in samples.items():
        lines += [f"### `{prompt}`", "", "| strategy | continuation |", "| --- | --- |"]
        for name, text in by_strategy.items():
            shown = text.replace("|", "\\|").replace("\n", "⏎ ").strip()
            lines.append(f"| {name} | {shown} |")
        lines.append("")
    data_md = out / "data" / "data_report.md"
    lines += ["## Data", "", data_md.read_text(encoding="utf-8").replace("# Data report", "").strip()
              if data_md.exists() else json.dumps(data_report, indent=2), ""]
    report = out / "report.md"
    write_text(report, "\n".join(lines))
    return report


# ------------------------------------------------------------------------------------------- main
def run_quickstart(plan: QuickstartPlan, out: Path) -> Path:
    """Every stage, each skipped when a previous run finished it; `plan.minutes` bounds the whole run."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "quickstart.json"
    if plan_path.exists():  # a rerun: continue the run that was started, whatever the flags say now
        plan = from_dict(QuickstartPlan, json.loads(plan_path.read_text(encoding="utf-8")))
        say(f"resuming the run in {out} (delete it to start over)")
    data_report = prepare_data(plan, out / "data")
    data_s = time.perf_counter() - started
    measured = probe(plan, out)
    if plan.steps == 0:
        left = plan.minutes * 60 - (time.perf_counter() - started)
        plan.steps = steps_that_fit(plan, measured, left)
        say(f"train: one step of {plan.batch_size}x{plan.seq_len} tokens takes {measured.step_s:.2f} s here: "
            f"{plan.steps} steps fit the {plan.minutes:g}-minute budget ({left:.0f} s left after the data)")
    if not plan_path.exists():
        write_text(plan_path, json.dumps(to_dict(plan), indent=2))
    facts = {"parameters": measured.parameters, "model_config": measured.model_config,
             "val_loss_before": measured.val_loss, "data_s": data_s, "train_s": 0.0, "sample_s": 0.0}
    t1 = time.perf_counter()
    try:
        train(plan, out)
    except KeyboardInterrupt:
        # Leave what finished usable: the last checkpoint as OUT's model, and a report saying how far it got.
        facts["train_s"] = time.perf_counter() - t1
        if publish_model(out) is not None:
            write_report(out, plan, facts, data_report, {}, interrupted=True)
        raise
    facts["train_s"] = time.perf_counter() - t1
    publish_model(out)
    t2 = time.perf_counter()
    samples = sample(out)
    facts["sample_s"] = time.perf_counter() - t2
    return write_report(out, plan, facts, data_report, samples)
