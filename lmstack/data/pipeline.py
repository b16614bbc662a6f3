"""`prepare`: documents -> clean -> dedup -> (train a tokenizer) -> token shards, resumable and atomic.

Stages, all under a work directory `.<OUT>.lmstack-partial/` next to OUT:
1. ingest + clean + dedup -> spool chunks (spool/train, spool/val, or spool/all for the tail split).
   Worker processes normalise, filter and MinHash batches of documents; the main process keeps
   the order and makes the dedup decisions (they depend on every earlier document). The stage
   ends by writing stage1.json; an interrupted stage 1 is redone from the start.
2. tokenizer: the given one, or one trained on the spooled (clean, deduplicated) training text.
3. tokenise: spool chunk i -> shard i, in worker processes. A shard is finished once its .json
   exists; a rerun of the same command keeps finished shards and tokenises only the rest.
4. publish: hard-link the shards into OUT's layout with index.json, tokenizer/ and the data
   report, then rename the whole directory onto OUT in one step and delete the work directory.
OUT therefore never exists half-written. A work directory left by a run with a different
configuration or different inputs is discarded (the fingerprint in work.json tells them apart).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from lmstack.atomic import cannot_write, ensure_parent_writable, replace_directory
from lmstack.data import pack
from lmstack.data.builtin import python_docs_fingerprint, read_builtin
from lmstack.data.clean import QualityConfig, QualityFilter, normalize
from lmstack.data.dedup import DedupConfig, MinHasher, NearDuplicateIndex, exact_key, shingle_hashes
from lmstack.data.ingest import IngestStats, expand_inputs, read_documents
from lmstack.data.report import build_report, write_report
from lmstack.errors import DataError
from lmstack.tokenizer import Tokenizer, train_tokenizer

WORK_SUFFIX = ".lmstack-partial"
NO_VALIDATION = ("lmstack data: warning: no validation split (--val-fraction 0): `lmstack pretrain` on this "
                 "data trains without evaluation")


class EmptyValidationSplit(DataError):
    """--val-fraction asked for a validation split, but the data is too small to give it any text."""
BATCH_CHARS = 1 << 18  # characters per worker task in stage 1: amortises IPC, yet many tasks per MB


@dataclass
class PrepareConfig:
    """Everything `lmstack data prepare` does; loaded with lmstack.schema (YAML + `--a.b=value`)."""

    inputs: list[str] = field(default_factory=list)
    corpus: str | None = None  # e.g. builtin:python-docs, instead of inputs
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = "text"  # JSONL key (dotted for nested) or Parquet column
    text_unit: Literal["file", "paragraph", "line"] = "file"  # what one document of a text file is
    strict: bool = False  # a malformed JSONL line / missing field is an error instead of skipped
    tokenizer: str | None = None  # a tokenizer directory ...
    train_tokenizer: str | None = None  # ... or KIND:VOCAB to train one, e.g. bpe:8192, char:0
    output: str = ""
    clean: bool = True
    quality: QualityConfig = field(default_factory=QualityConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    split: Literal["document", "tail"] = "document"
    val_fraction: float = 0.05
    shard_chars: int = 64_000_000  # characters of text per shard (~16M tokens for English BPE)
    workers: int = 2
    overwrite: bool = False

    def validate(self) -> None:
        if bool(self.inputs) == bool(self.corpus):
            raise DataError("give either --input PATHS or --corpus builtin:NAME (exactly one)")
        if bool(self.tokenizer) == bool(self.train_tokenizer):
            raise DataError("give either --tokenizer DIR or --train-tokenizer KIND:VOCAB (exactly one)")
        if not self.output:
            raise DataError("--out is required (the output directory)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_chars <= 0 or self.workers < 0:
            raise DataError("shard_chars must be > 0 and workers >= 0")
        if not 0.0 < self.dedup.threshold <= 1.0:
            raise DataError(f"dedup.threshold must be in (0, 1], got {self.dedup.threshold}")
        if self.train_tokenizer:
            parse_tokenizer_spec(self.train_tokenizer)


def parse_tokenizer_spec(spec: str) -> tuple[str, int | None]:
    """`bpe:8192` -> ("bpe", 8192); `char` or `char:0` -> ("char", None) (keep every character)."""
    kind, _, size = spec.partition(":")
    if not size or size == "0":
        if kind != "char":
            raise DataError(f"--train-tokenizer {spec!r}: give a vocabulary size, e.g. {kind}:8192")
        return kind, None
    try:
        return kind, int(size)
    except ValueError:
        raise DataError(f"--train-tokenizer {spec!r}: vocabulary size {size!r} is not an integer") from None


# ---------------------------------------------------------------------- worker side of stage 1
_worker_state: dict[str, Any] = {}


def _init_clean_worker(clean: bool, quality: QualityConfig, dedup: DedupConfig) -> None:
    _worker_state.update(clean=clean, filter=QualityFilter(quality), dedup=dedup,
                         hasher=MinHasher(dedup.num_perm, dedup.seed) if dedup.near else None)


def _clean_batch(texts: list[str]) -> list[tuple[str | None, str, bytes | None, bytes | None]]:
    """Worker: each text -> (failed rule or None, cleaned text, exact key, MinHash signature bytes)."""
    out = []
    clean, quality, dedup, hasher = (_worker_state[k] for k in ("clean", "filter", "dedup", "hasher"))
    for text in texts:
        if clean:
            text = normalize(text)
            failed = quality.first_failure(text) if text else "empty_after_normalize"
            if failed is not None:
                out.append((failed, "", None, None))
                continue
        key = exact_key(text) if dedup.exact else None
        sig = hasher.signature(shingle_hashes(text, dedup.shingle_size)).tobytes() if hasher else None
        out.append((None, text, key, sig))
    return out


def ordered_map(pool: Any, fn: Callable, items: Iterable, max_in_flight: int) -> Iterator:
    """`fn` over `items` in worker processes, results in input order, at most `max_in_flight` queued.

    (Pool.imap would read the whole input ahead of the workers; the bound keeps memory flat.)
    """
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= max_in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _batches(texts: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _init_worker(initializer: Callable | None, initargs: tuple) -> None:
    # The processes are the parallelism: one Rust thread each (and no fork warning from tokenizers).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if initializer is not None:
        initializer(*initargs)


def _make_pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()) -> Any:
    """A process pool of `workers`, or None (work inline in this process) for workers <= 1."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        return None
    # fork: workers inherit the imported modules (importing torch afresh would cost seconds each)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(workers, initializer=_init_worker,
                                                     initargs=(initializer, initargs))


def _progress(desc: str, unit: str, total: int | None = None) -> tqdm:
    """A progress bar on stderr when it is a terminal (logs and tests stay clean)."""
    return tqdm(desc=f"lmstack data: {desc}", unit=unit, total=total, disable=not sys.stderr.isatty(),
                file=sys.stderr, leave=False)


# ---------------------------------------------------------------------- stage 1
@dataclass
class Stage1Stats:
    """What stage 1 counted (saved as work/stage1.json, so a resumed run still reports it)."""

    ingest: dict = field(default_factory=dict)
    filtered: dict[str, int] = field(default_factory=dict)
    exact_duplicates: int = 0
    near_duplicates: int = 0
    near_candidates_checked: int = 0
    kept: dict[str, int] = field(default_factory=dict)  # documents per spool (train/val/all)
    chunks: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _document_source(cfg: PrepareConfig, stats: IngestStats) -> Iterator[str]:
    if cfg.corpus:
        docs = read_builtin(cfg.corpus, stats)
    else:
        docs = read_documents(expand_inputs(cfg.inputs), stats, fmt=cfg.format, text_field=cfg.text_field,
                              text_unit=cfg.text_unit, strict=cfg.strict)
    return (d.text for d in docs)


def run_stage1(cfg: PrepareConfig, work: Path) -> Stage1Stats:
    """Ingest, clean and dedup every document into spool chunks; returns the counts for the report."""
    t0 = time.perf_counter()
    spool_root = work / "spool"
    shutil.rmtree(spool_root, ignore_errors=True)
    names = ["all"] if cfg.split == "tail" else ["train", "val"]
    writers = {name: pack.SpoolWriter(spool_root / name, cfg.shard_chars) for name in names}
    ingest = IngestStats()
    filtered: Counter[str] = Counter()
    seen_exact: set[bytes] = set()
    locations: list[tuple[str, int, int]] = []  # kept document id -> (spool, chunk, index)

    def fetch_shingles(doc_id: int) -> np.ndarray:
        name, chunk, index = locations[doc_id]
        return shingle_hashes(writers[name].text(chunk, index), cfg.dedup.shingle_size)

    near = NearDuplicateIndex(cfg.dedup, fetch_shingles) if cfg.dedup.near else None
    exact_dups = near_dups = 0
    dedup = cfg.dedup
    pool = _make_pool(cfg.workers, _init_clean_worker, (cfg.clean, cfg.quality, dedup))
    progress = _progress("clean+dedup", "doc")
    try:
        results = ordered_map(pool, _clean_batch, _batches(_document_source(cfg, ingest), BATCH_CHARS),
                              max_in_flight=2 * max(cfg.workers, 1))
        for batch in results:
            progress.update(len(batch))
            for failed, text, key, sig_bytes in batch:
                if failed is not None:
                    filtered[failed] += 1
                    continue
                if key is not None:
                    if key in seen_exact:
                        exact_dups += 1
                        continue
                    seen_exact.add(key)
                if near is not None:
                    sig = np.frombuffer(sig_bytes, dtype=np.uint64)
                    # the lambda runs inside this call (only on a band hit), never after `text` moves on
                    if near.find(sig, lambda: shingle_hashes(text, dedup.shingle_size)) is not None:
                        near_dups += 1
                        continue
                k = len(locations)
                if cfg.split == "tail":
                    name = "all"
                else:  # every (1/f)-th kept document goes to val: exactly round(f * n), spread evenly
                    name = "val" if int((k + 1) * cfg.val_fraction) > int(k * cfg.val_fraction) else "train"
                chunk, index = writers[name].add(text)
                locations.append((name, chunk, index))
                if near is not None:
                    near.add(k, sig)
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
    for writer in writers.values():
        writer.flush()
    if ingest.documents == 0:
        source = cfg.corpus or " ".join(cfg.inputs)
        raise DataError(f"empty input: no documents in {source} ({_ingest_summary(ingest)})")
    if not locations:
        raise DataError(f"no documents left after cleaning and dedup: {ingest.documents} read, "
                           f"dropped by filters {dict(filtered)}, exact duplicates {exact_dups}, "
                           f"near duplicates {near_dups}; relax the filters (--quality.RULE=null) or use --no-clean")
    if cfg.split == "document" and cfg.val_fraction > 0 and writers["val"].num_documents == 0:
        n = len(locations)
        raise EmptyValidationSplit(
            f"the validation split is empty: {n} document{'s' if n > 1 else ''} kept, and --val-fraction "
            f"{cfg.val_fraction:g} of {n} rounds to 0 (a later `lmstack pretrain` could not evaluate); use --split "
            f"tail (the last {cfg.val_fraction:g} of the token stream)"
            + (f", a --val-fraction of at least {1 / n:.3g}" if n > 1 else "")
            + (", --text-unit paragraph for more documents" if cfg.text_unit == "file" and not cfg.corpus else "")
            + ", or --val-fraction 0 for no validation split")
    return Stage1Stats(
        ingest=dataclasses.asdict(ingest), filtered=dict(filtered), exact_duplicates=exact_dups,
        near_duplicates=near_dups, near_candidates_checked=near.candidates_checked if near else 0,
        kept={n: w.num_documents for n, w in writers.items()}, chunks={n: w.num_chunks for n, w in writers.items()},
        seconds=time.perf_counter() - t0)


def _ingest_summary(stats: IngestStats) -> str:
    return (f"{stats.files} files, {stats.records} records, {stats.malformed_lines} malformed lines, "
            f"{stats.missing_field} without the text field, {stats.empty_documents} empty")


# ---------------------------------------------------------------------- stages 2-4
def spool_texts(spool_dir: Path, num_chunks: int) -> Iterator[str]:
    """Every document of a spool, in order (one chunk memory-mapped at a time)."""
    for chunk in range(num_chunks):
        yield from pack.iter_chunk_documents(spool_dir, chunk)


def prepare_tokenizer(cfg: PrepareConfig, work: Path, stage1: Stage1Stats) -> Tokenizer:
    """The tokenizer to use, saved (once) at work/tokenizer: loaded from --tokenizer or trained on the spool."""
    target = work / "tokenizer"
    if target.exists():
        return Tokenizer.load(target)
    if cfg.tokenizer:
        tokenizer = Tokenizer.load(cfg.tokenizer)
    else:
        kind, vocab = parse_tokenizer_spec(cfg.train_tokenizer or "")
        name = "all" if cfg.split == "tail" else "train"
        print(f"lmstack data: training a {kind} tokenizer (vocab {vocab or 'all characters'}) on "
              f"{stage1.kept[name]} clean documents", file=sys.stderr)
        tokenizer = train_tokenizer(spool_texts(work / "spool" / name, stage1.chunks[name]), kind, vocab)
    tokenizer.save(target)
    return tokenizer


def run_tokenize(cfg: PrepareConfig, work: Path, stage1: Stage1Stats,
                 tokenizer: Tokenizer) -> dict[str, list[dict]]:
    """Tokenise every spool chunk that has no finished shard yet; returns each spool's shard metas in order."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"{cfg.tokenizer or 'the trained tokenizer'}: has no eos token "
                           "(set eos_token in tokenizer_config.json); shards need one between documents")
    jobs: list[pack.ShardJob] = []
    metas: dict[str, list[dict | None]] = {}
    resumed = 0
    for name, num_chunks in stage1.chunks.items():
        shard_dir = work / "shards" / name
        shard_dir.mkdir(parents=True, exist_ok=True)
        resumed += pack.remove_unfinished(shard_dir)
        metas[name] = [pack.read_shard_meta(shard_dir, i) for i in range(num_chunks)]
        jobs += [pack.ShardJob(str(work / "spool" / name), str(shard_dir), i, str(work / "tokenizer"), eos,
                               tokenizer.vocab_size) for i in range(num_chunks) if metas[name][i] is None]
    if resumed:
        print(f"lmstack data: resuming: {resumed} finished shards kept, {len(jobs)} to tokenise", file=sys.stderr)
    pool = _make_pool(min(cfg.workers, len(jobs)))
    progress = _progress("tokenize", "shard", total=len(jobs))
    try:
        for job, meta in zip(jobs, ordered_map(pool, pack.tokenize_chunk, jobs, max_in_flight=2 * max(cfg.workers, 1))):
            metas[Path(job.shard_dir).name][job.chunk] = meta
            progress.update(1)
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
    return {name: [m for m in ms if m is not None] for name, ms in metas.items()}


def work_dir_for(output: Path) -> Path:
    return output.parent / f".{output.name}{WORK_SUFFIX}"


def fingerprint(cfg: PrepareConfig) -> str:
    """Hash of everything that determines the output: the config (not workers/overwrite) and the inputs' identity."""
    data = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items()
            if k not in ("workers", "overwrite", "output")}
    if cfg.corpus:
        data["corpus_identity"] = python_docs_fingerprint()
    else:
        data["input_files"] = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
                               for p in expand_inputs(cfg.inputs)]
    if cfg.tokenizer:
        tok = Path(cfg.tokenizer)
        data["tokenizer_files"] = [(p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                   for p in sorted(tok.glob("*.json"))] if tok.is_dir() else str(tok)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _open_work_dir(cfg: PrepareConfig, output: Path) -> Path:
    work = work_dir_for(output)
    key = fingerprint(cfg)
    state_path = work / "work.json"
    if work.exists():
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            state = {}
        if state.get("fingerprint") != key:
            print(f"lmstack data: discarding {work} (left by a run with other inputs or options)", file=sys.stderr)
            shutil.rmtree(work)
    if not work.exists():
        work.mkdir(parents=True)
        pack.write_json(state_path, {"fingerprint": key, "config": json.loads(json.dumps(dataclasses.asdict(cfg)))})
    return work


def prepare(cfg: PrepareConfig) -> dict:
    """Run the whole pipeline into cfg.output (see the module docstring); returns the data report."""
    cfg.validate()
    output = Path(cfg.output)
    if output.exists() and not cfg.overwrite:
        raise DataError(f"{output}: already exists (pass --overwrite to replace it)")
    ensure_parent_writable(output.resolve())
    parent = output.resolve().parent
    if cfg.tokenizer:
        Tokenizer.load(cfg.tokenizer)  # a bad tokenizer directory fails now, not after stage 1
    with _exclusive(parent / f".{output.name}.lmstack-lock", output):
        return _run(cfg, output)


@contextlib.contextmanager
def _exclusive(lock_path: Path, output: Path) -> Iterator[None]:
    """Hold an exclusive lock for OUT, so a second `prepare` into it fails instead of sharing its work dir."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    try:
        handle = open(lock_path, "w")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise cannot_write(output, e) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"{output}: another `lmstack data prepare` is writing it") from None
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)


def _run(cfg: PrepareConfig, output: Path) -> dict:
    t0 = time.perf_counter()
    work = _open_work_dir(cfg, output)
    stage1_path = work / "stage1.json"
    if stage1_path.exists():
        stage1 = Stage1Stats(**json.loads(stage1_path.read_text(encoding="utf-8")))
        print("lmstack data: resuming: cleaning and dedup already done", file=sys.stderr)
    else:
        try:
            stage1 = run_stage1(cfg, work)
        except BaseException:  # bad input or an interrupt: stage 1 restarts anyway, keep nothing
            shutil.rmtree(work, ignore_errors=True)
            raise
        pack.write_json(stage1_path, dataclasses.asdict(stage1))
    tokenizer = prepare_tokenizer(cfg, work, stage1)
    t1 = time.perf_counter()
    metas = run_tokenize(cfg, work, stage1, tokenizer)
    tokenize_seconds = time.perf_counter() - t1
    header = pack.IndexHeader(tokenizer.vocab_size, tokenizer.eos_token_id, tokenizer.sha256())
    final = work / "final"
    shutil.rmtree(final, ignore_errors=True)
    if cfg.split == "tail":
        train_index, val_index = pack.publish_tail_split(work / "shards" / "all", metas["all"], cfg.val_fraction,
                                                         final / "train", final / "val", header)
    else:
        train_index = pack.publish_shards(work / "shards" / "train", metas["train"], final / "train", header)
        val_index = pack.publish_shards(work / "shards" / "val", metas["val"], final / "val", header)
    if cfg.val_fraction > 0 and val_index["num_tokens"] == 0:
        raise EmptyValidationSplit(f"the validation split is empty: the last {cfg.val_fraction:g} of "
                                   f"{train_index['num_tokens']} tokens is less than one token; raise --val-fraction "
                                   "or give more text (or --val-fraction 0 for no validation split)")
    if cfg.val_fraction == 0:
        print(NO_VALIDATION, file=sys.stderr)
    shutil.copytree(work / "tokenizer", final / "tokenizer")
    all_metas = [m for ms in metas.values() for m in ms]
    report = build_report(cfg, stage1, all_metas, train_index, val_index, header,
                          tokenize_seconds=tokenize_seconds, total_seconds=time.perf_counter() - t0)
    write_report(final, report)
    replace_directory(final, output)
    shutil.rmtree(work, ignore_errors=True)
    return report
