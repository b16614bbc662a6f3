"""A task from any JSONL through a small YAML file: the prompt template, the choices, the answer, few-shot.

    name: my_quiz
    kind: multiple_choice          # or generate
    data: quiz.jsonl               # JSONL (or a JSON list), plain / .gz / .bz2; relative to this YAML file
    fewshot_data: quiz_dev.jsonl   # optional dev split; without it, few-shot examples are other items
    prompt: "Question: {{question}}\\nAnswer:"   # Jinja2 over the record's fields
    choices: choices               # a field holding a list, a template rendering one, or a literal list
    answer: answer                 # index, choice text or letter label; generate: a reference or a list
    subject: category              # optional field: per-subject scores
    description: ""                # text before the first example
    shots: 0
    target_delimiter: " "          # lm-evaluation-harness's names and defaults from here on
    fewshot_delimiter: "\\n\\n"
    until: ["\\n\\n"]                # generate: stop strings
    max_new_tokens: 128
    metrics: [exact_match, f1]     # generate: exact_match, f1 (SQuAD), bleu (sacrebleu), rouge (rouge-score)

The field names mirror lm-evaluation-harness's (doc_to_text, doc_to_choice, doc_to_target are prompt,
choices, answer here), so one JSONL serves both. Templates are rendered in a Jinja2 sandbox; a missing
field is an error naming file:line.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.sandbox

from lmstack.errors import ConfigError, DataError
from lmstack.eval.files import read_records
from lmstack.eval.tasks import GenDoc, GenTask, MCDoc, MCTask, check_gold
from lmstack.schema import from_dict, load_yaml

GENERATION_METRICS = ("exact_match", "f1", "bleu", "rouge")


@dataclass
class TaskFile:
    """The schema of a YAML task file (unknown keys and wrong types fail naming the key)."""

    name: str
    data: str
    kind: Literal["multiple_choice", "generate"] = "multiple_choice"
    fewshot_data: str | None = None
    prompt: str = "{{question}}"
    choices: str | list[str] | None = None
    answer: str = "answer"
    fewshot_answer: str | None = None  # generate: what a few-shot example shows (default: answer's first)
    subject: str | None = None
    description: str = ""
    shots: int = 0
    fewshot_order: Literal["first_n", "random"] = "first_n"
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    until: list[str] = field(default_factory=lambda: ["\n\n"])
    max_new_tokens: int = 128
    metrics: list[str] = field(default_factory=lambda: ["exact_match", "f1"])


_ENV = jinja2.sandbox.ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


class _Field:
    """A task-file value: a record field's name, a Jinja2 template, or a literal."""

    def __init__(self, spec: Any, key: str, source: str):
        self.spec, self.key = spec, key
        self.template = None
        if isinstance(spec, str) and ("{{" in spec or "{%" in spec):
            try:
                self.template = _ENV.from_string(spec)
            except jinja2.TemplateSyntaxError as e:
                raise ConfigError(f"{source}: {key}: invalid template ({e.message})") from None

    def get(self, record: dict[str, Any], where: str, literal: bool = False) -> Any:
        if self.template is not None:
            try:
                text = self.template.render(**record)
            except jinja2.UndefinedError as e:
                raise DataError(f"{where}: {self.key} template: {e.message}") from None
            except jinja2.TemplateError as e:
                raise DataError(f"{where}: {self.key} template failed ({e})") from None
            if literal and text.strip()[:1] in ("[", "{") or (literal and text.strip().lstrip("-").isdigit()):
                try:  # lm-eval renders lists (choices.text) and indices as text and reads them back
                    return ast.literal_eval(text.strip())
                except (ValueError, SyntaxError):
                    return text
            return text
        if isinstance(self.spec, str) and literal:
            if self.spec not in record:
                raise DataError(f"{where}: missing field {self.spec!r} ({self.key}); fields: {', '.join(record)}")
            return record[self.spec]
        return self.spec


def _answer_index(value: Any, choices: list[str], where: str) -> int:
    """An answer as an index, a choice's text, or a letter label (A, B, ...)."""
    if isinstance(value, str) and value not in choices:
        stripped = value.strip()
        if len(stripped) == 1 and stripped.isalpha() and stripped.upper() in "ABCDEFGHIJ"[:len(choices)]:
            return "ABCDEFGHIJ".index(stripped.upper())
    if isinstance(value, str) and value in choices:
        return choices.index(value)
    return check_gold(value, len(choices), where)


def load_task_file(path: str | Path, data: str | Path | None = None) -> MCTask | GenTask:
    """Read a YAML task file (and its data). `data` overrides the file's `data:` (e.g. --data on the CLI)."""
    path = Path(path)
    try:
        spec = from_dict(TaskFile, load_yaml(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    source = str(path)
    prompt = _Field(spec.prompt, "prompt", source)
    answer = _Field(spec.answer, "answer", source)
    fewshot_answer = _Field(spec.fewshot_answer, "fewshot_answer", source) if spec.fewshot_answer else None
    subject = _Field(spec.subject, "subject", source) if spec.subject else None
    if spec.kind == "multiple_choice" and spec.choices is None:
        raise ConfigError(f"{path}: choices: a multiple_choice task needs choices (a field, template or list)")
    choices = _Field(spec.choices, "choices", source) if spec.choices is not None else None
    if spec.kind == "generate":
        unknown = [m for m in spec.metrics if m not in GENERATION_METRICS]
        if unknown or not spec.metrics:
            raise ConfigError(f"{path}: metrics: {unknown or 'none'}; choose from {', '.join(GENERATION_METRICS)}")

    def read(file: str | Path) -> list[MCDoc] | list[GenDoc]:
        file = Path(file)
        file = file if file.is_absolute() or file.exists() else path.parent / file
        docs = []
        for number, record in read_records(file):
            where = f"{file}:{number}"
            query = prompt.get(record, where)
            topic = str(subject.get(record, where, literal=True)) if subject else ""
            if spec.kind == "multiple_choice":
                options = choices.get(record, where, literal=True)
                if not isinstance(options, list) or len(options) < 2 or not all(isinstance(c, str) for c in options):
                    raise DataError(f"{where}: choices must be a list of at least two strings, got {options!r:.80}")
                gold = _answer_index(answer.get(record, where, literal=True), options, where)
                docs.append(MCDoc(query, options, gold, topic, where))
            else:
                refs = answer.get(record, where, literal=True)
                refs = [refs] if isinstance(refs, (str, int, float)) else refs
                if not isinstance(refs, list) or not refs:
                    raise DataError(f"{where}: answer must be a string or a non-empty list of strings")
                refs = [str(r) for r in refs]
                shown = str(fewshot_answer.get(record, where, literal=True)) if fewshot_answer else refs[0]
                docs.append(GenDoc(query, refs, shown, topic, where))
        if not docs:
            raise DataError(f"{file}: no records")
        return docs

    docs = read(data if data is not None else spec.data)
    fewshot = None
    if spec.fewshot_data:
        pool = read(spec.fewshot_data)
        fewshot = {}
        for doc in pool:
            fewshot.setdefault(doc.subject, []).append(doc)
    descriptions = {doc.subject: spec.description for doc in docs}
    common = dict(name=spec.name, docs=docs, fewshot=fewshot, descriptions=descriptions,
                  target_delimiter=spec.target_delimiter, fewshot_delimiter=spec.fewshot_delimiter,
                  default_shots=spec.shots, fewshot_order=spec.fewshot_order)
    if spec.kind == "multiple_choice":
        return MCTask(**common)
    return GenTask(**common, metrics=list(spec.metrics), until=list(spec.until), max_new_tokens=spec.max_new_tokens)


__all__ = ["GENERATION_METRICS", "TaskFile", "load_task_file"]
