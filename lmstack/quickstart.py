"""`lmstack quickstart`: from nothing to a chatting model with a report, on the built-in corpus, in minutes.

    lmstack quickstart [--out runs/quickstart] [--minutes 8] [--preset NAME] [--corpus PATH...]
    lmstack quickstart --out runs/quickstart --resume      (continue an interrupted run)

1. data      `lmstack data prepare`: clean, dedup, byte-level BPE tokenizer, token shards, data report
2. model     a small Llama-style model, sized so the run fits the time budget on this machine
3. train     the real engine (`lmstack pretrain`'s code path): progress bar, evaluation, checkpoints
4. samples   a few prompts with greedy, nucleus sampling and beam search side by side
5. report    OUT/report.md with the loss curve, the data report, parameters, tokens/s, perplexity
             before and after, and the samples

OUT is a Hugging Face model directory (config.json, model.safetensors, tokenizer files), so
`lmstack chat --model OUT` and `transformers.AutoModelForCausalLM.from_pretrained(OUT)` open it.
Stages that finished are kept: after a Ctrl-C (which leaves the last checkpoint), running the same
command again (or `--resume`) continues the run; options that differ from the run's are refused by
name, and `--restart` starts over. A run that fails leaves no OUT behind (unless OUT held a run before).
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

from lmstack.atomic import make_output_dir, write_text
from lmstack.errors import ConfigError
from lmstack.schema import from_dict, read_json, to_dict

# The default model: ~4M parameters (3.95M at vocabulary 4096), a few thousand tokens/s on two CPU cores in fp32.
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
    preset: str | None = None  # None: the QUICKSTART_MODEL default
    model: dict = field(default_factory=lambda: dict(QUICKSTART_MODEL))
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 0  # as asked; 0 = as many as fit `minutes`
    minutes: float = 8.0
    seed: int = 0
    lr: float = 2e-3
    train_steps: int = 0  # what training runs: `steps`, or the count chosen from a timing of the first steps
    finished: bool = False  # every stage done: a rerun only points at the report


# The options a user sets, as the command line spells them (QuickstartPlan field -> flag).
FLAGS = {"corpus": "--corpus", "vocab_size": "--vocab-size", "preset": "--preset", "seq_len": "--seq-len",
         "batch_size": "--batch-size", "steps": "--steps", "minutes": "--minutes", "seed": "--seed"}
PLAN_FILE = "quickstart.json"


def say(message: str) -> None:
    print(f"lmstack quickstart: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- stages
def prepare_config(plan: QuickstartPlan, data_dir: Path):
    """The PrepareConfig of stage 1+2: what `lmstack data prepare --corpus ... --train-tokenizer bpe:VOCAB
    --val-fraction 0.05` builds, the built-in corpus's quality defaults included."""
    from lmstack.data.builtin import BUILTIN_QUALITY_DEFAULTS
    from lmstack.data.pipeline import PrepareConfig

    builtin = [c for c in plan.corpus if c.startswith("builtin:")]
    if builtin and len(plan.corpus) > 1:
        raise ConfigError("--corpus: give either one builtin:NAME or your own files/directories, not both")
    quality = dict(BUILTIN_QUALITY_DEFAULTS.get(builtin[0].removeprefix("builtin:"), {})) if builtin else {}
    return from_dict(PrepareConfig, {
        "corpus": builtin[0] if builtin else None, "inputs": [] if builtin else list(plan.corpus),
        "train_tokenizer": f"bpe:{plan.vocab_size}", "output": str(data_dir), "val_fraction": 0.05,
        "split": "document", "quality": quality})


def prepare_data(plan: QuickstartPlan, data_dir: Path) -> dict:
    """Stage 1+2: the data pipeline with a BPE tokenizer trained on the cleaned text (skipped if done).

    Validation text is held-out documents spread over the corpus (every 20th kept document), as
    `lmstack data prepare` splits by default. A corpus of too few documents for that (one big file)
    is split by its token stream's last 5% instead.
    """
    from lmstack.data.pipeline import EmptyValidationSplit, prepare

    report_path = data_dir / "data_report.json"
    if report_path.exists():
        say(f"data: already prepared in {data_dir}")
        return json.loads(report_path.read_text(encoding="utf-8"))
    cfg = prepare_config(plan, data_dir)
    say(f"data: cleaning, deduplicating and tokenising {', '.join(plan.corpus)}")
    try:
        report = prepare(cfg)
    except EmptyValidationSplit:
        report = None
    if report is None or report["split"]["val"]["tokens"] < plan.seq_len + 1:
        say("data: too few held-out documents to validate on; using the last 5% of the token stream instead")
        report = prepare(dataclasses.replace(cfg, split="tail", overwrite=True))
    return report


def pretrain_config(plan: QuickstartPlan, out: Path, steps: int | None = None):
    """The PretrainConfig this quickstart trains with: the same recipe and engine as `lmstack pretrain`."""
    from lmstack.train.config import PretrainConfig

    steps = max(steps or plan.train_steps, 1)
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
        if state["step"] >= plan.train_steps:
            say(f"train: already finished ({plan.train_steps} steps) in {out / 'run'}")
            return None
        say(f"train: resuming from {checkpoint} (step {state['step']} of {plan.train_steps})")
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
        *([f"**Interrupted** during training: the model is the last checkpoint; `lmstack quickstart --out {out} "
           "--resume` continues the run.", ""] if interrupted else []),
        f"Output directory `{out}` is a Hugging Face model directory: `lmstack chat --model {out}` opens it.", "",
        "| | |", "| --- | ---: |",
        f"| corpus | {', '.join(plan.corpus)} |",
        f"| parameters | {facts['parameters']:,} |",
        f"| model | {c.num_layers} layers, width {c.hidden_size}, {c.num_heads} heads ({c.num_kv_heads} kv), "
        f"vocab {c.vocab_size}, context {c.max_seq_len} |",
        f"| optimizer steps | {train[-1]['step'] if train else 0} of {plan.train_steps} "
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
def _shown(field_name: str, value) -> str:
    if field_name == "corpus":
        return " ".join(value)
    if field_name == "preset":
        return value or "(default model)"
    if field_name == "steps" and not value:
        return "(time budget)"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _check_corpus(cfg) -> None:
    from lmstack.data.builtin import corpus_names
    from lmstack.data.ingest import expand_inputs

    cfg.validate()
    if cfg.inputs:
        expand_inputs(cfg.inputs)  # each path exists and holds readable files
    elif cfg.corpus.removeprefix("builtin:") not in corpus_names():
        raise ConfigError(f"--corpus {cfg.corpus}: unknown built-in corpus (known: "
                          f"{', '.join('builtin:' + n for n in corpus_names())})")


def open_run(plan: QuickstartPlan, out: Path, given: set[str] | None = None, resume: bool = False,
             restart: bool = False) -> tuple[QuickstartPlan, bool]:
    """What this invocation does with OUT -> (the plan to run, whether OUT is new).

    OUT absent or empty: a new run (`resume` has nothing to continue: an error). OUT holding a quickstart
    run: continue it, unless an option differs from the run's (refused by name) or `restart` starts over.
    `given`: the QuickstartPlan fields the user set explicitly; with `resume` only those are compared, without
    it every option is (running the same command again continues the run).
    """
    plan_path = out / PLAN_FILE
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a directory")
    if out.is_dir() and not plan_path.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and holds no quickstart run (no {PLAN_FILE}); choose another --out")
    if not plan_path.exists():
        if resume:
            raise ConfigError(f"--resume: {out} holds no quickstart run to continue (run without --resume to "
                              "start one)")
        return plan, True
    if restart:
        say(f"--restart: deleting the run in {out} and starting over")
        shutil.rmtree(out)
        return plan, True
    stored = from_dict(QuickstartPlan, read_json(plan_path, ConfigError))
    if not stored.train_steps and stored.steps:  # written before train_steps existed
        stored.train_steps = stored.steps
    compared = (given or set()) if resume else set(FLAGS)
    differ = [name for name in FLAGS if name in compared and getattr(stored, name) != getattr(plan, name)]
    if differ:
        was = " ".join(f"{FLAGS[n]} {_shown(n, getattr(stored, n))}" for n in differ)
        now = " ".join(f"{FLAGS[n]} {_shown(n, getattr(plan, n))}" for n in differ)
        raise ConfigError(f"{out} holds a quickstart run started with {was}, but this command asks for {now}. "
                          f"Continue that run with `lmstack quickstart --out {out} --resume`, add --restart to "
                          "delete it and start over with these options, or choose another --out")
    say(f"resuming the run in {out} (--restart starts over)")
    return stored, False


def run_quickstart(plan: QuickstartPlan, out: Path, given: set[str] | None = None, resume: bool = False,
                   restart: bool = False) -> Path:
    """Every stage, each skipped when a previous run finished it; `plan.minutes` bounds the whole run.

    Ctrl-C keeps what finished (the next run continues it); any other failure of a new run removes OUT.
    """
    started = time.perf_counter()
    _check_corpus(prepare_config(plan, out / "data"))  # a bad corpus fails before anything is written
    plan, fresh = open_run(plan, out, given, resume, restart)
    make_output_dir(out)
    try:
        if fresh:
            write_text(out / PLAN_FILE, json.dumps(to_dict(plan), indent=2))
        return _stages(plan, out, started)
    except KeyboardInterrupt:
        raise
    except BaseException:
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _stages(plan: QuickstartPlan, out: Path, started: float) -> Path:
    if plan.finished and (out / "report.md").exists():
        say(f"the run in {out} is finished; nothing to do (--restart starts over)")
        return out / "report.md"
    data_report = prepare_data(plan, out / "data")
    data_s = time.perf_counter() - started
    measured = probe(plan, out)
    if not plan.train_steps:
        if plan.steps:
            plan.train_steps = plan.steps
        else:
            left = plan.minutes * 60 - (time.perf_counter() - started)
            plan.train_steps = steps_that_fit(plan, measured, left)
            say(f"train: one step of {plan.batch_size}x{plan.seq_len} tokens takes {measured.step_s:.2f} s here: "
                f"{plan.train_steps} steps fit the {plan.minutes:g}-minute budget ({left:.0f} s left after the data)")
        write_text(out / PLAN_FILE, json.dumps(to_dict(plan), indent=2))
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
    report = write_report(out, plan, facts, data_report, samples)
    plan.finished = True
    write_text(out / PLAN_FILE, json.dumps(to_dict(plan), indent=2))
    return report
