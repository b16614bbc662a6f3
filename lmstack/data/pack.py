"""Spool chunks of clean text -> memory-mapped token shards (the `lmstack-tokens-v1` format).

The pipeline writes the documents that survive cleaning and dedup into *spool chunks*
(`chunk-NNNNN.txt`, the UTF-8 texts concatenated, and `chunk-NNNNN.idx`, uint64 byte offsets (n+1,)).
Chunk i becomes shard i: a worker process tokenises it and writes

    shard-NNNNN.bin       flat little-endian token ids (uint16 when vocab_size <= 65536, else uint32),
                          each document followed by eos_token_id
    shard-NNNNN.docs.bin  uint64 (n,) start offset of each document within the shard
    shard-NNNNN.json      {"num_tokens", "num_documents", "num_chars", "num_bytes"}: written last, so
                          its presence is what marks the shard finished (resume skips such shards)

Every file is written under a temporary name and renamed, so a killed run never leaves a
half-written file under a final name. `finalize_split` then writes index.json for a split.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

FORMAT = "lmstack-tokens-v1"
ENCODE_BATCH_CHARS = 1 << 20  # characters per encode_batch call: bounds a worker's memory, not its speed


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32; always little-endian."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def dtype_name(dtype: np.dtype) -> str:
    return "uint16" if dtype.itemsize == 2 else "uint32"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def replace_atomically(tmp: Path, final: Path) -> None:
    """fsync then rename `tmp` onto `final`: the final name only ever holds a complete file."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_json(path: Path, data: object) -> None:
    tmp = _tmp_name(path)
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    replace_atomically(tmp, path)


class SpoolWriter:
    """Appends documents to numbered spool chunks of about `chunk_chars` characters each.

    The open chunk lives in memory (bounded by chunk_chars) and is written, atomically, when full;
    `text(chunk, i)` returns any written or pending document, which near-dedup verification needs.
    """

    def __init__(self, directory: Path, chunk_chars: int) -> None:
        self.directory = directory
        self.chunk_chars = chunk_chars
        directory.mkdir(parents=True, exist_ok=True)
        self.num_chunks = 0
        self.pending: list[str] = []
        self.pending_chars = 0
        self.num_documents = 0

    def add(self, text: str) -> tuple[int, int]:
        """Append a document; returns its (chunk, index within chunk)."""
        where = (self.num_chunks, len(self.pending))
        self.pending.append(text)
        self.pending_chars += len(text)
        self.num_documents += 1
        if self.pending_chars >= self.chunk_chars:
            self.flush()
        return where

    def flush(self) -> None:
        if not self.pending:
            return
        encoded = [t.encode("utf-8") for t in self.pending]
        offsets = np.zeros(len(encoded) + 1, dtype="<u8")
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        stem = self.directory / f"chunk-{self.num_chunks:05d}"
        for suffix, payload in ((".txt", b"".join(encoded)), (".idx", offsets.tobytes())):
            final = stem.with_suffix(suffix)
            tmp = _tmp_name(final)
            tmp.write_bytes(payload)
            replace_atomically(tmp, final)
        self.num_chunks += 1
        self.pending, self.pending_chars = [], 0

    def text(self, chunk: int, index: int) -> str:
        if chunk == self.num_chunks:
            return self.pending[index]
        return read_chunk_document(self.directory, chunk, index)


def read_chunk_offsets(directory: Path, chunk: int) -> np.ndarray:
    return np.fromfile(directory / f"chunk-{chunk:05d}.idx", dtype="<u8")


def read_chunk_document(directory: Path, chunk: int, index: int) -> str:
    """One document of a written chunk, read by seeking (the chunk is not loaded whole)."""
    offsets = read_chunk_offsets(directory, chunk)
    start, end = int(offsets[index]), int(offsets[index + 1])
    with open(directory / f"chunk-{chunk:05d}.txt", "rb") as f:
        f.seek(start)
        return f.read(end - start).decode("utf-8")


def iter_chunk_documents(directory: Path, chunk: int) -> Iterator[str]:
    """The documents of one chunk, in order (the chunk's text is memory-mapped, not read whole)."""
    offsets = read_chunk_offsets(directory, chunk)
    if len(offsets) < 2:
        return
    data = np.memmap(directory / f"chunk-{chunk:05d}.txt", dtype=np.uint8, mode="r")
    for i in range(len(offsets) - 1):
        yield bytes(data[int(offsets[i]):int(offsets[i + 1])]).decode("utf-8")


def count_chunks(directory: Path) -> int:
    return len(list(directory.glob("chunk-*.idx")))


@dataclass
class ShardJob:
    """Tokenise spool chunk `chunk` of `spool_dir` into shard `chunk` of `shard_dir`."""

    spool_dir: str
    shard_dir: str
    chunk: int
    tokenizer_dir: str
    eos_token_id: int
    vocab_size: int


def shard_paths(shard_dir: Path, index: int) -> tuple[Path, Path, Path]:
    stem = f"shard-{index:05d}"
    return shard_dir / f"{stem}.bin", shard_dir / f"{stem}.docs.bin", shard_dir / f"{stem}.json"


_TOKENIZER_CACHE: dict[tuple[str, int, int], Any] = {}


def _load_tokenizer_cached(directory: str) -> Any:
    """Tokenizer.load once per process and tokenizer.json version (a worker tokenises many chunks)."""
    from lmstack.tokenizer import Tokenizer

    stat = (Path(directory) / "tokenizer.json").stat()
    key = (str(Path(directory).resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _TOKENIZER_CACHE:
        _TOKENIZER_CACHE.clear()
        _TOKENIZER_CACHE[key] = Tokenizer.load(directory)
    return _TOKENIZER_CACHE[key]


def tokenize_chunk(job: ShardJob) -> dict:
    """Worker: one spool chunk -> one finished shard (bin, docs.bin, then json). Returns the json's dict.

    The tokenizer is loaded from its directory in the worker (never sent pickled); documents are
    encoded ENCODE_BATCH_CHARS at a time and streamed to disk, so memory stays bounded.
    """
    tokenizer = _load_tokenizer_cached(job.tokenizer_dir)
    dtype = token_dtype(job.vocab_size)
    spool_dir, shard_dir = Path(job.spool_dir), Path(job.shard_dir)
    bin_path, docs_path, meta_path = shard_paths(shard_dir, job.chunk)
    tmp_bin, tmp_docs = _tmp_name(bin_path), _tmp_name(docs_path)
    starts: list[int] = []
    num_tokens = num_chars = num_bytes = 0
    batch: list[str] = []
    batch_chars = 0

    def encode(out: BinaryIO) -> None:
        nonlocal num_tokens
        for ids in tokenizer.encode_batch(batch):
            starts.append(num_tokens)
            row = np.empty(len(ids) + 1, dtype=dtype)  # (T_doc + 1,) the document, then eos
            row[:-1] = ids
            row[-1] = job.eos_token_id
            out.write(row.tobytes())
            num_tokens += len(row)

    with open(tmp_bin, "wb") as out:
        for text in iter_chunk_documents(spool_dir, job.chunk):
            batch.append(text)
            batch_chars += len(text)
            num_chars += len(text)
            num_bytes += len(text.encode("utf-8"))
            if batch_chars >= ENCODE_BATCH_CHARS:
                encode(out)
                batch, batch_chars = [], 0
        if batch:
            encode(out)
    np.asarray(starts, dtype="<u8").tofile(tmp_docs)
    replace_atomically(tmp_bin, bin_path)
    replace_atomically(tmp_docs, docs_path)
    meta = {"file": bin_path.name, "num_tokens": num_tokens, "num_documents": len(starts),
            "doc_offsets": docs_path.name, "num_chars": num_chars, "num_bytes": num_bytes}
    write_json(meta_path, meta)
    return meta


def remove_unfinished(shard_dir: Path) -> int:
    """Delete temporaries and shard files without their .json (a run killed mid-shard); returns how many shards were kept."""
    if not shard_dir.exists():
        return 0
    for tmp in shard_dir.glob(".*.tmp-*"):
        tmp.unlink()
    kept = 0
    for bin_path in sorted(shard_dir.glob("shard-*.bin")):
        if bin_path.name.endswith(".docs.bin"):
            continue
        stem = bin_path.name[:-len(".bin")]
        if (shard_dir / f"{stem}.json").exists():
            kept += 1
        else:
            bin_path.unlink()
            (shard_dir / f"{stem}.docs.bin").unlink(missing_ok=True)
    return kept


def read_shard_meta(shard_dir: Path, index: int) -> dict | None:
    meta_path = shard_paths(shard_dir, index)[2]
    if not meta_path.exists():
        return None
    return json.loads(meta_path.read_text(encoding="utf-8"))


@dataclass
class IndexHeader:
    """The per-split fields of index.json that do not depend on the shards."""

    vocab_size: int
    eos_token_id: int
    tokenizer_sha256: str

    def index(self, shards: list[dict]) -> dict:
        """index.json content for `shards` (each: file, num_tokens, num_documents, doc_offsets, ...)."""
        return {
            "format": FORMAT, "dtype": dtype_name(token_dtype(self.vocab_size)), "vocab_size": self.vocab_size,
            "eos_token_id": self.eos_token_id, "tokenizer_sha256": self.tokenizer_sha256,
            "num_tokens": sum(s["num_tokens"] for s in shards),
            "num_documents": sum(s["num_documents"] for s in shards),
            "shards": [{k: s[k] for k in ("file", "num_tokens", "num_documents", "doc_offsets")} for s in shards],
        }


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(src, dst)


def publish_shards(shard_dir: Path, metas: list[dict], out_dir: Path, header: IndexHeader) -> dict:
    """Hard-link finished shards into `out_dir` (renumbered from 0) and write its index.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    published = []
    for new_index, meta in enumerate(metas):
        bin_dst, docs_dst, _ = shard_paths(out_dir, new_index)
        _link_or_copy(shard_dir / meta["file"], bin_dst)
        _link_or_copy(shard_dir / meta["doc_offsets"], docs_dst)
        published.append({**meta, "file": bin_dst.name, "doc_offsets": docs_dst.name})
    index = header.index(published)
    write_json(out_dir / "index.json", index)
    return index


def publish_tail_split(shard_dir: Path, metas: list[dict], val_fraction: float, train_dir: Path,
                       val_dir: Path, header: IndexHeader) -> tuple[dict, dict]:
    """Split the concatenated token stream: the last `val_fraction` of tokens go to val (nanoGPT style).

    The shard holding the cut is written as two new files; the others are hard-linked. A document
    crossing the cut continues at offset 0 of the first val shard, listed there as a document start.
    """
    total = sum(m["num_tokens"] for m in metas)
    cut = total - int(round(total * val_fraction))
    dtype = token_dtype(header.vocab_size)
    train_metas: list[dict] = []
    val_metas: list[dict] = []
    train_dir.mkdir(parents=True, exist_ok=True)
    val_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    for meta in metas:
        end = start + meta["num_tokens"]
        if end <= cut:
            train_metas.append(meta)
        elif start >= cut:
            val_metas.append(meta)
        else:  # the cut falls inside this shard: write its two halves as new shards
            local = cut - start
            tokens = np.memmap(shard_dir / meta["file"], dtype=dtype, mode="r")
            offsets = np.fromfile(shard_dir / meta["doc_offsets"], dtype="<u8")
            head_offsets = offsets[offsets < local]
            tail_offsets = np.concatenate([[0], offsets[offsets > local] - local]).astype("<u8")
            for part, part_tokens, part_offsets, bucket in (
                    ("head", tokens[:local], head_offsets, train_metas),
                    ("tail", tokens[local:], tail_offsets, val_metas)):
                name = meta["file"].replace(".bin", f".{part}")
                np.asarray(part_tokens).tofile(shard_dir / f"{name}.bin")
                part_offsets.tofile(shard_dir / f"{name}.docs.bin")
                bucket.append({"file": f"{name}.bin", "doc_offsets": f"{name}.docs.bin",
                               "num_tokens": len(part_tokens), "num_documents": len(part_offsets)})
            del tokens
        start = end
    train_index = publish_shards(shard_dir, train_metas, train_dir, header)
    val_index = publish_shards(shard_dir, val_metas, val_dir, header)
    return train_index, val_index
