"""Multiple-choice benchmarks read from their public file layouts into one form: `MCDoc` items.

    hellaswag   HellaSwag JSONL (ctx_a, ctx_b, activity_label, endings, label) or the 6-lines-per-task text
                form llama.cpp reads (label: context / gold index / 4 endings); lm-eval's preprocessing
    mmlu        the original CSV layout (no header: question, A, B, C, D, answer letter), a `data/`
                directory with test/ and dev/ (or a directory / file of SUBJECT_test.csv); 5-shot from dev
    mmlu-redux  MMLU-Redux rows (question, choices, answer index, error_type) as CSV with a header or JSONL,
                one file per subject or a directory of them; only error_type "ok" items are scored
    arc         ARC JSONL, AI2's layout (question.stem, question.choices[{text, label}], answerKey) or the
                Hugging Face one (question, choices{text, label}, answerKey)

Prompts follow lm-evaluation-harness's task definitions (hellaswag, mmlu default, arc_easy) so scores
are comparable. Few-shot examples come from a dev split when the layout has one, otherwise from other
items of the same subject (never the item itself).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.errors import DataError, InputFileError
from lmstack.eval.files import read_csv, read_jsonl, read_text, require


@dataclass
class MCDoc:
    """One multiple-choice item: the query as the model reads it, the choice texts and the gold index."""

    query: str
    choices: list[str]
    gold: int
    subject: str = ""
    where: str = ""  # file:line, for messages and the per-item output


@dataclass
class MCTask:
    """A multiple-choice task: its items, an optional dev split per subject, and how a prompt is laid out."""

    name: str
    docs: list[MCDoc]
    fewshot: dict[str, list[MCDoc]] | None = None  # subject -> dev items, or None: other items of the subject
    descriptions: dict[str, str] = field(default_factory=dict)  # subject -> text before the first example
    target_delimiter: str = " "  # between query and answer
    fewshot_delimiter: str = "\n\n"  # after each example
    default_shots: int = 0
    fewshot_order: str = "first_n"  # dev split: its first k ("first_n"), or "random" (seeded per item)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> items left out while reading
    report_subjects: bool = True  # per-subject scores (HellaSwag's activity labels only pick few-shot examples)


@dataclass
class GenDoc:
    """One generation item: the prompt's query, the reference answers, and what a few-shot example shows
    after its query (by default the first reference)."""

    query: str
    references: list[str]
    fewshot_target: str = ""
    subject: str = ""
    where: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # task-specific fields (a program's tests, ...)


@dataclass
class GenTask:
    """A generation task: items, few-shot pool and layout, decoding limits and the metrics to compute."""

    name: str
    docs: list[GenDoc]
    metrics: list[str]
    fewshot: dict[str, list[GenDoc]] | None = None
    descriptions: dict[str, str] = field(default_factory=dict)
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    default_shots: int = 0
    fewshot_order: str = "first_n"
    until: list[str] = field(default_factory=lambda: ["\n\n"])
    max_new_tokens: int = 128
    skipped: dict[str, int] = field(default_factory=dict)


def check_gold(gold: Any, n_choices: int, where: str) -> int:
    if isinstance(gold, str) and gold.strip().lstrip("-").isdigit():
        gold = int(gold)
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < n_choices:
        raise DataError(f"{where}: answer {gold!r} is not a choice index in 0..{n_choices - 1}")
    return gold


# ------------------------------------------------------------------------------------------- HellaSwag
def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's hellaswag preprocess: WikiHow '[title]' markers and bracketed artifacts out."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: Path) -> MCTask:
    """HellaSwag from its JSONL or the 6-line text form. Few-shot: other items with the same activity label
    (there is no dev split beside the validation file)."""
    docs: list[MCDoc] = []
    text = read_text(path)
    if text.lstrip().startswith("{"):
        for number, record in read_jsonl(path):
            where = f"{path}:{number}"
            endings = require(record, "endings", list, where)
            label = require(record, "activity_label", str, where)
            ctx = require(record, "ctx_a", str, where) + " " + require(record, "ctx_b", str, where).capitalize()
            docs.append(MCDoc(hellaswag_preprocess(label + ": " + ctx), [hellaswag_preprocess(e) for e in endings],
                              check_gold(record.get("label"), len(endings), where), label, where))
    else:
        lines = text.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        if len(lines) % 6:
            raise DataError(f"{path}: {len(lines)} lines; the text form has 6 lines per task (context, gold index, "
                            "4 endings)")
        for start in range(0, len(lines), 6):
            where = f"{path}:{start + 1}"
            context, gold, *endings = lines[start:start + 6]
            label = context.split(":", 1)[0] if ":" in context else ""
            docs.append(MCDoc(hellaswag_preprocess(context), [hellaswag_preprocess(e) for e in endings],
                              check_gold(gold.strip(), 4, f"{path}:{start + 2}"), label, where))
    return MCTask("hellaswag", docs, report_subjects=False)


# ------------------------------------------------------------------------------------------- MMLU
LETTERS = ["A", "B", "C", "D"]


def mmlu_query(question: str, choices: list[str]) -> str:
    """lm-eval's mmlu doc_to_text."""
    lines = [question.strip()] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices)]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def _mmlu_csv(path: Path, subject: str) -> list[MCDoc]:
    docs = []
    for number, row in read_csv(path):
        where = f"{path}:{number}"
        if len(row) != 6:
            raise DataError(f"{where}: an MMLU row has 6 fields (question, A, B, C, D, answer), got {len(row)}")
        answer = row[5].strip().upper()
        if answer not in LETTERS:
            raise DataError(f"{where}: answer {row[5]!r} is not one of A, B, C, D")
        docs.append(MCDoc(mmlu_query(row[0], row[1:5]), list(LETTERS), LETTERS.index(answer), subject, where))
    return docs


def _split_files(path: Path, split: str) -> dict[str, Path]:
    """subject -> file for SUBJECT_SPLIT.csv under path (directly, or in path/SPLIT/)."""
    for folder in (path / split, path):
        files = sorted(folder.glob(f"*_{split}.csv")) if folder.is_dir() else []
        if files:
            return {f.name[:-len(f"_{split}.csv")]: f for f in files}
    return {}


def read_mmlu(path: Path) -> MCTask:
    """MMLU's CSV layout: a file SUBJECT_test.csv (dev beside it as SUBJECT_dev.csv or ../dev/), or a directory
    holding test/ and dev/ (Hendrycks' data/), or the CSVs themselves."""
    if path.is_file():
        subject = path.name.split("_test.csv")[0] if path.name.endswith("_test.csv") else path.stem
        tests = {subject: path}
        devs = {s: f for s, f in {**_split_files(path.parent.parent, "dev"), **_split_files(path.parent, "dev")}.items()
                if s == subject}
    elif path.is_dir():
        tests, devs = _split_files(path, "test"), _split_files(path, "dev")
        if not tests:
            raise InputFileError(f"{path}: no SUBJECT_test.csv files here or in {path / 'test'}")
    else:
        raise InputFileError(f"{path}: no such file or directory")
    docs = [doc for subject, file in tests.items() for doc in _mmlu_csv(file, subject)]
    fewshot = {subject: _mmlu_csv(file, subject) for subject, file in devs.items()} or None
    return MCTask("mmlu", docs, fewshot, {s: mmlu_description(s) for s in tests}, default_shots=5)


def _redux_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    if read_text(path).lstrip().startswith("{"):
        return [(f"{path}:{n}", r) for n, r in read_jsonl(path)]
    return [(f"{path}:{n}", r) for n, r in read_csv(path, header=True)]


def read_mmlu_redux(path: Path) -> MCTask:
    """MMLU-Redux: question, choices (a list, or its Python/JSON text in CSV), answer (index), error_type.
    Items whose error_type is not "ok" are left out (counted in `skipped`); the subject is the file's stem
    (or a `subject` field). Few-shot: other items of the subject."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".csv", ".jsonl", ".gz", ".bz2")) if path.is_dir() else [path]
    if not files:
        raise InputFileError(f"{path}: no .csv / .jsonl files")
    docs, skipped = [], {}
    for file in files:
        for where, record in _redux_rows(file):
            question = require(record, "question", str, where)
            choices = record.get("choices")
            if isinstance(choices, str):
                try:
                    choices = ast.literal_eval(choices)
                except (ValueError, SyntaxError):
                    raise DataError(f"{where}: choices {choices[:60]!r} is not a list") from None
            if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or len(choices) < 2:
                raise DataError(f"{where}: 'choices' must be a list of at least two strings")
            error_type = str(record.get("error_type", "ok")).strip()
            if error_type != "ok":
                skipped[f"error_type={error_type}"] = skipped.get(f"error_type={error_type}", 0) + 1
                continue
            subject = str(record.get("subject") or file.name.split(".")[0])
            docs.append(MCDoc(mmlu_query(question, choices), LETTERS[:len(choices)],
                              check_gold(record.get("answer"), len(choices), where), subject, where))
    subjects = {d.subject for d in docs}
    return MCTask("mmlu-redux", docs, None, {s: mmlu_description(s) for s in subjects}, default_shots=5,
                  skipped=skipped)


# ------------------------------------------------------------------------------------------- ARC
def read_arc(path: Path) -> MCTask:
    """ARC JSONL in AI2's or Hugging Face's layout; lm-eval's prompt 'Question: ...\\nAnswer:' and the choice
    texts as continuations. Few-shot: other items."""
    docs = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        question = record.get("question")
        if isinstance(question, dict):  # AI2: {"stem", "choices": [{"text", "label"}]}
            stem = require(question, "stem", str, where)
            entries = require(question, "choices", list, where)
            texts = [require(c, "text", str, where) for c in entries]
            labels = [str(require(c, "label", (str, int), where)) for c in entries]
        else:  # Hugging Face: question str, choices {"text": [...], "label": [...]}
            stem = require(record, "question", str, where)
            choices = require(record, "choices", dict, where)
            texts = require(choices, "text", list, where)
            labels = [str(label) for label in require(choices, "label", list, where)]
        answer = str(require(record, "answerKey", (str, int), where))
        if answer not in labels:
            raise DataError(f"{where}: answerKey {answer!r} is not one of the labels {labels}")
        docs.append(MCDoc(f"Question: {stem}\nAnswer:", texts, labels.index(answer), "", where))
    return MCTask("arc", docs)


READERS = {"hellaswag": read_hellaswag, "mmlu": read_mmlu, "mmlu-redux": read_mmlu_redux, "arc": read_arc}


def read_task(name: str, path: str | Path) -> MCTask:
    path = Path(path)
    if name not in READERS:
        raise DataError(f"unknown multiple-choice task {name!r} (known: {', '.join(READERS)})")
    if not path.exists():
        raise InputFileError(f"{path}: no such file or directory")
    task = READERS[name](path)
    if not task.docs:
        raise DataError(f"{path}: no {name} items found")
    return task


__all__ = [
    "LETTERS",
    "READERS",
    "GenDoc",
    "GenTask",
    "MCDoc",
    "MCTask",
    "check_gold",
    "hellaswag_preprocess",
    "mmlu_description",
    "mmlu_query",
    "read_arc",
    "read_hellaswag",
    "read_mmlu",
    "read_mmlu_redux",
    "read_task",
]
