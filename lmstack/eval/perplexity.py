"""Perplexity of text files, with lm-evaluation-harness's rolling windows and definitions.

A document (a text file, or each record of a JSONL file) is tokenized without special tokens and scored
whole: rolling, non-overlapping windows of the model's context, the first conditioned on BOS (EOS when the
tokenizer has none), every token predicted exactly once (`lmstack.eval.loglikelihood.rolling_windows`).
With `stride` (< the context) windows overlap: each scores only its last `stride` new tokens with the
rest of its window as context, which gives every token more context at more compute.

    token_perplexity = exp(-sum ll / tokens)          (depends on the tokenizer: compare like with like)
    word_perplexity  = exp(-sum ll / words)           words = len(re.split(r"\\s+", document))
    byte_perplexity  = exp(-sum ll / bytes)           UTF-8 bytes of the document
    bits_per_byte    = -sum ll / (bytes * ln 2)

(Where a tokenizer adds BOS by default, lm-eval's `hf` backend also encodes that BOS into the document and
scores it after the prefix BOS; lmstack scores the document's own tokens only.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from lmstack.errors import DataError, InputFileError
from lmstack.eval.files import read_records, read_text
from lmstack.eval.loglikelihood import Scorer, rolling_windows, strided_windows
from lmstack.eval.metrics import bits_per_byte, count_words, weighted_perplexity
from lmstack.eval.multiple_choice import prefix_token
from lmstack.eval.report import Metric, TaskResult
from lmstack.model.protocol import CausalLM


def read_documents(paths: list[str | Path], text_field: str = "text") -> list[tuple[str, str]]:
    """(name, text) per document: each text file whole (plain, .gz or .bz2; directories: their files in
    name order), or each record of a .jsonl / .json file (its `text_field`)."""
    documents = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        elif path.exists():
            files = [path]
        else:
            raise InputFileError(f"{path}: no such file or directory")
        for file in files:
            if ".jsonl" in file.suffixes or ".json" in file.suffixes:
                for number, record in read_records(file):
                    text = record.get(text_field)
                    if not isinstance(text, str):
                        raise DataError(f"{file}:{number}: no string field {text_field!r}")
                    documents.append((f"{file}:{number}", text))
            else:
                documents.append((str(file), read_text(file)))
    empty = [name for name, text in documents if not text.strip()]
    documents = [(name, text) for name, text in documents if text.strip()]
    if not documents:
        raise DataError(f"no text in {', '.join(map(str, paths))}" + (f" ({len(empty)} empty)" if empty else ""))
    return documents


def evaluate_perplexity(model: CausalLM, tokenizer, documents: list[tuple[str, str]], batch_size: int = 8,
                        stride: int | None = None, max_length: int | None = None,
                        progress: Callable[[int], None] | None = None) -> TaskResult:
    """Score every document; token / word / byte perplexity and bits per byte over all of them."""
    scorer = Scorer(model, batch_size=batch_size, max_length=max_length)
    window = scorer.max_length
    prefix = prefix_token(tokenizer)
    encoded = tokenizer.encode_batch([text for _, text in documents], add_special_tokens=False)
    items, owner = [], []
    for d, ids in enumerate(encoded):
        windows = (rolling_windows(ids, prefix, window) if stride is None or stride >= window
                   else strided_windows(ids, prefix, window, stride))
        items += windows
        owner += [d] * len(windows)
    started = time.perf_counter()
    scores = scorer.score(items, progress)
    seconds = time.perf_counter() - started

    lls = [0.0] * len(documents)
    for d, score in zip(owner, scores):
        lls[d] += score[0].logprob
    tokens = [len(ids) for ids in encoded]
    words = [count_words(text) for _, text in documents]
    nbytes = [len(text.encode("utf-8")) for _, text in documents]
    n = len(documents)
    metrics = [Metric("word_perplexity", weighted_perplexity(lls, words), None, n),
               Metric("byte_perplexity", weighted_perplexity(lls, nbytes), None, n),
               Metric("bits_per_byte", bits_per_byte(lls, nbytes), None, n),
               Metric("token_perplexity", weighted_perplexity(lls, tokens), None, n)]
    samples = [{"document": name, "loglikelihood": ll, "tokens": t, "words": w, "bytes": b}
               for (name, _), ll, t, w, b in zip(documents, lls, tokens, words, nbytes)]
    info = {"documents": n, "tokens": sum(tokens), "words": sum(words), "bytes": sum(nbytes),
            "windows": len(items), "window": window, "stride": stride or window, "seconds": round(seconds, 3),
            "tokens_per_s": round(sum(tokens) / seconds, 1) if seconds > 0 else None}
    return TaskResult("perplexity", metrics, {}, samples, info)


__all__ = ["evaluate_perplexity", "read_documents"]
