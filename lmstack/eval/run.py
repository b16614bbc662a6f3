"""One evaluation run: a typed `EvalConfig` (what `lmstack eval` parses its flags into) -> results on disk.

    record, samples = run_eval(EvalConfig(model="runs/x", task="hellaswag", data=["hellaswag.txt.bz2"]))

Tasks: perplexity, hellaswag, mmlu, mmlu-redux, arc, gsm8k, squad, humaneval, judge, or the path of a YAML
task file (lmstack.eval.taskfile).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.errors import CheckpointError, ConfigError, DataError, InputFileError
from lmstack.eval.report import TaskResult, run_record

MC_TASKS = ("hellaswag", "mmlu", "mmlu-redux", "arc")
GEN_TASKS = ("gsm8k", "squad")
TASKS = ("perplexity", *MC_TASKS, *GEN_TASKS, "humaneval", "judge")


@dataclass
class EvalConfig:
    model: str  # model directory (Hugging Face / lmstack), with its tokenizer
    task: str  # one of TASKS, or a YAML task file
    data: list[str] = field(default_factory=list)  # data files / directories (a YAML task file has its own)
    adapter: str | None = None  # adapter directory, passed to load_model(model, adapter=...)
    shots: int | None = None  # few-shot examples (default: the task's)
    limit: int | None = None  # the first N items only
    batch_size: int = 8
    out: str | None = None  # run directory: results.json, results.md, samples.jsonl, subjects.png
    strict: bool = False  # a prompt longer than the context is an error instead of left-truncated
    seed: int = 1234
    device: str | None = None
    max_length: int | None = None  # scoring window (default: the model's context)
    stride: int | None = None  # perplexity: overlapping windows advancing by this many tokens
    max_new_tokens: int | None = None  # generation tasks (default: the task's)
    text_field: str = "text"  # perplexity on JSONL: the field holding the text
    # humaneval
    samples: str | None = None  # a human-eval samples JSONL {task_id, completion} instead of generating
    n: int = 1  # samples per problem
    temperature: float = 0.8  # sampling temperature when n > 1
    k: list[int] = field(default_factory=lambda: [1, 10, 100])
    timeout: float = 10.0  # seconds per program
    memory_mb: int = 1024  # address-space limit per program
    self_test: bool = True  # canonical solutions must pass, empty ones must fail
    # judge
    model_b: str | None = None  # the model compared against `model`
    judge: str | None = None  # the judge model directory

    def validate(self) -> None:
        if self.task not in TASKS and not self.task.endswith((".yaml", ".yml")):
            raise ConfigError(f"--task {self.task!r}: choose one of {', '.join(TASKS)}, or give a YAML task file")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")
        if self.shots is not None and self.shots < 0:
            raise ConfigError(f"--shots must be >= 0, got {self.shots}")
        if self.task in TASKS and not self.data:
            raise ConfigError(f"--task {self.task} needs --data PATH (the package ships no benchmark data)")
        if self.task == "judge" and (self.model_b is None or self.judge is None):
            raise ConfigError("--task judge needs --model-b DIR (the other model) and --judge DIR")
        if self.n < 1:
            raise ConfigError(f"--n must be >= 1, got {self.n}")


def load(directory: str, adapter: str | None, device: str | None):
    """(model in eval mode, tokenizer) from a model directory, with an adapter when given."""
    from lmstack.interop.hf import load_model
    from lmstack.tokenizer import Tokenizer

    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model directory")
    model = load_model(path, device=device, adapter=adapter)
    return model.eval(), Tokenizer.load(path)


def _one_data(config: EvalConfig) -> Path:
    if len(config.data) != 1:
        raise ConfigError(f"--task {config.task} reads one --data path, got {len(config.data)}")
    return Path(config.data[0])


def evaluate(config: EvalConfig, progress: Callable[[int], None] | None = None,
             total: Callable[[int], None] | None = None) -> TaskResult:
    """Run the configured task. `total(n)` is told how many units `progress` will count."""
    from lmstack.eval.generation import GENERATION_READERS, evaluate_generation
    from lmstack.eval.multiple_choice import evaluate_multiple_choice
    from lmstack.eval.tasks import GenTask, read_task

    config.validate()
    model, tokenizer = load(config.model, config.adapter, config.device)
    say = total or (lambda n: None)
    if config.task == "perplexity":
        from lmstack.eval.perplexity import evaluate_perplexity, read_documents

        documents = read_documents(config.data, config.text_field)[:config.limit]
        return evaluate_perplexity(model, tokenizer, documents, config.batch_size, config.stride, config.max_length,
                                   progress)
    if config.task == "humaneval":
        return _humaneval(config, model, tokenizer, progress, say)
    if config.task == "judge":
        return _judge(config, model, tokenizer, progress, say)
    if config.task in MC_TASKS:
        task = read_task(config.task, _one_data(config))
    elif config.task in GEN_TASKS:
        path = _one_data(config)
        if not path.exists():
            raise InputFileError(f"{path}: no such file")
        task = GENERATION_READERS[config.task](path)
    else:
        from lmstack.eval.taskfile import load_task_file

        task = load_task_file(config.task, _one_data(config) if config.data else None)
    say(min(len(task.docs), config.limit or len(task.docs)))
    if isinstance(task, GenTask):
        return evaluate_generation(model, tokenizer, task, config.shots, config.limit, config.batch_size,
                                   config.strict, config.max_new_tokens, config.seed, progress)
    return evaluate_multiple_choice(model, tokenizer, task, config.shots, config.limit, config.batch_size,
                                    config.strict, config.max_length, config.seed, progress)


def _humaneval(config: EvalConfig, model, tokenizer, progress, say) -> TaskResult:
    from lmstack.eval.humaneval import evaluate_humaneval, generate_samples, read_problems, read_samples
    from lmstack.eval.sandbox import Limits

    problems = read_problems(_one_data(config))[:config.limit]
    if config.samples is not None:
        samples = read_samples(Path(config.samples), problems)
    else:
        say(len(problems) * config.n)
        samples = generate_samples(model, tokenizer, problems, config.n, config.temperature,
                                   config.max_new_tokens or 512, config.batch_size, config.seed, progress)
    limits = Limits(timeout_s=config.timeout, memory_bytes=config.memory_mb << 20,
                    cpu_seconds=max(1, int(config.timeout) + 1))
    return evaluate_humaneval(problems, samples, tuple(config.k), limits, config.strict, config.self_test)


def _judge(config: EvalConfig, model, tokenizer, progress, say) -> TaskResult:
    from lmstack.eval.files import read_records
    from lmstack.eval.generation import generate_answers
    from lmstack.eval.judge import pairwise

    questions = []
    for number, record in read_records(_one_data(config)):
        text = record.get("prompt", record.get("question", record.get("instruction")))
        if not isinstance(text, str):
            raise DataError(f"{config.data[0]}:{number}: needs a string 'prompt' (or 'question' / 'instruction')")
        questions.append(text)
    questions = questions[:config.limit]
    tokens = config.max_new_tokens or 128
    answers_a, _ = generate_answers(model, tokenizer, questions, [], tokens, config.batch_size)
    model_b, tokenizer_b = load(config.model_b, None, config.device)
    answers_b, _ = generate_answers(model_b, tokenizer_b, questions, [], tokens, config.batch_size)
    judge, judge_tokenizer = load(config.judge, None, config.device)
    say(2 * len(questions))
    return pairwise(judge, judge_tokenizer, questions, answers_a, answers_b, config.batch_size, progress=progress)


def settings(config: EvalConfig) -> dict[str, Any]:
    """The options that shaped this run's numbers (those that apply to its task)."""
    keep = ["data", "shots", "limit", "batch_size", "strict", "seed", "max_length"]
    if config.task == "perplexity":
        keep = ["data", "limit", "batch_size", "max_length", "stride", "text_field"]
    elif config.task == "humaneval":
        keep = ["data", "limit", "samples", "n", "temperature", "k", "timeout", "memory_mb", "max_new_tokens", "seed"]
    elif config.task == "judge":
        keep = ["data", "limit", "model_b", "judge", "max_new_tokens", "batch_size"]
    elif config.task in GEN_TASKS or config.task.endswith((".yaml", ".yml")):
        keep.append("max_new_tokens")
    return {k: getattr(config, k) for k in keep if getattr(config, k) not in (None, [], False)}


def run_eval(config: EvalConfig, progress: Callable[[int], None] | None = None,
             total: Callable[[int], None] | None = None) -> tuple[dict[str, Any], TaskResult]:
    """Evaluate and, with `config.out`, write the run directory. Returns (the results record, the result)."""
    from lmstack.eval.report import write_run

    result = evaluate(config, progress, total)
    record = run_record(result, config.model, config.adapter, settings(config))
    if config.out is not None:
        write_run(config.out, record, result.samples)
    return record, result


__all__ = ["MC_TASKS", "TASKS", "EvalConfig", "evaluate", "load", "run_eval"]
