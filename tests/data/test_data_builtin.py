"""builtin:python-docs: pydoc topics and stdlib docstrings parsed with ast equal what the live modules carry."""

from __future__ import annotations

import ast
import inspect
import json
import sysconfig
from pathlib import Path

import pytest

from lmstack.data import builtin
from lmstack.data.ingest import IngestStats


def test_topics_are_the_interpreter_help_texts() -> None:
    from pydoc_data.topics import topics

    docs = {d.source: d.text for d in builtin._topic_documents()}
    assert docs["pydoc_data.topics:if"] == topics["if"] and len(docs) == len(topics)


def test_module_docstrings_match_the_imported_module() -> None:
    path = Path(sysconfig.get_paths()["stdlib"]) / "json" / "__init__.py"
    parts = builtin._docstrings(ast.parse(path.read_bytes()), "json")
    assert parts[0] == f"Module json\n\n{inspect.cleandoc(json.__doc__)}"
    assert f"def json.dumps\n\n{inspect.cleandoc(json.dumps.__doc__)}" in parts
    assert builtin._module_name(path, path.parents[1]) == "json"


def test_unknown_corpus_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown corpus 'builtin:nope' \(known: builtin:python-docs\)"):
        builtin.read_builtin("builtin:nope", IngestStats())


@pytest.mark.slow
def test_whole_corpus_is_a_few_megabytes() -> None:
    stats = IngestStats()
    docs = list(builtin.read_builtin("builtin:python-docs", stats))
    assert sum(len(d.text) for d in docs) > 2_000_000 and stats.documents == len(docs) > 500
    assert not any("/test/" in d.source for d in docs)
