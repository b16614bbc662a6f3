"""Built-in corpora that every Python installation carries, read at run time (never copied into the repo).

`builtin:python-docs` = the interpreter's bundled reference-manual topics (`pydoc_data.topics`, the
text behind `help("if")`) plus the docstrings of the standard library, gathered by *parsing* each
stdlib source file with `ast` (nothing is imported or executed, so no module's side effects run and
platform-specific modules are read like any other). One document per topic and one per module:
the module docstring followed by each class's and function's docstring under its qualified name.
"""

from __future__ import annotations

import ast
import gc
import itertools
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from lmstack.data.ingest import Document, IngestStats
from lmstack.errors import ConfigError

# Test suites and demo trees repeat boilerplate docstrings and are not documentation.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "Tools", "turtledemo"}


def corpus_names() -> list[str]:
    return sorted(BUILTIN_CORPORA)


def python_docs_fingerprint() -> str:
    """What determines the corpus' content: the interpreter version and the stdlib location."""
    return f"python-docs:{sys.version.split()[0]}:{sysconfig.get_paths()['stdlib']}"


def _topic_documents() -> Iterator[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data; the stdlib docstrings still give a corpus
        return
    for name in sorted(topics):
        yield Document(topics[name], f"pydoc_data.topics:{name}")


def _docstrings(tree: ast.Module, module: str) -> list[str]:
    """Module docstring, then '<kind> <qualified name>' + docstring for every documented class/function."""
    parts: list[str] = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {module}\n\n{doc}")

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = f"{prefix}.{child.name}"
                child_doc = ast.get_docstring(child)
                if child_doc:
                    kind = "class" if isinstance(child, ast.ClassDef) else "def"
                    parts.append(f"{kind} {qualname}\n\n{child_doc}")
                visit(child, qualname)

    visit(tree, module)
    return parts


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _stdlib_documents(stats: IngestStats) -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))
    for path in files:
        try:
            raw = path.read_bytes()
            with warnings.catch_warnings():  # old stdlib files trigger SyntaxWarning (invalid escapes)
                warnings.simplefilter("ignore")
                # An AST is a tree (no reference cycles), yet building one allocates enough objects to
                # run the cyclic GC over and over: pausing it halves the parse time.
                gc.disable()
                try:
                    tree = ast.parse(raw, filename=str(path))
                finally:
                    gc.enable()
        except (OSError, SyntaxError, ValueError) as e:  # e.g. lib2to3 test data written in Python 2
            stats.warn(f"{path}: skipped ({type(e).__name__})")
            continue
        stats.bytes_read += len(raw)
        parts = _docstrings(tree, _module_name(path, root))
        if parts:
            yield Document("\n\n".join(parts), str(path))


def python_docs(stats: IngestStats) -> Iterator[Document]:
    """`builtin:python-docs`: pydoc topics, then stdlib module docstrings, in a fixed order."""
    stats.files += 1
    for doc in itertools.chain(_topic_documents(), _stdlib_documents(stats)):
        stats.records += 1
        if not doc.text.strip():
            stats.empty_documents += 1
            continue
        stats.documents += 1
        yield doc


BUILTIN_CORPORA = {"python-docs": python_docs}

# Quality-rule defaults per built-in corpus (the user's --config / --quality.* still override them).
# Reference documentation repeats n-grams on purpose (signatures, "Return a new ...", code examples),
# so Gopher's repetition rules, tuned on web pages, would drop a third of it.
BUILTIN_QUALITY_DEFAULTS: dict[str, dict[str, object]] = {
    "python-docs": {"max_top_ngram_char_fraction": {}, "max_duplicate_ngram_char_fraction": {}},
}


def read_builtin(name: str, stats: IngestStats) -> Iterator[Document]:
    """Documents of `builtin:NAME`; an unknown name lists the known ones."""
    key = name.removeprefix("builtin:")
    if key not in BUILTIN_CORPORA:
        known = ", ".join(f"builtin:{n}" for n in corpus_names())
        raise ConfigError(f"unknown corpus {name!r} (known: {known})")
    return BUILTIN_CORPORA[key](stats)
