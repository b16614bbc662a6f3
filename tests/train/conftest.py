"""Helpers for training tests: write token shards in the lmstack-tokens-v1 format ourselves
(np.tofile + index.json), so these tests do not depend on `lmstack data prepare`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def write_split(directory: Path, tokens: np.ndarray, vocab_size: int, eos_token_id: int, shard_tokens: int) -> None:
    """Write `tokens` as shards of at most `shard_tokens` ids plus index.json."""
    directory.mkdir(parents=True, exist_ok=True)
    dtype = "uint16" if vocab_size <= 65536 else "uint32"
    shards = []
    for i, start in enumerate(range(0, len(tokens), shard_tokens)):
        piece = tokens[start:start + shard_tokens].astype(dtype)
        name = f"shard-{i:05d}.bin"
        piece.tofile(directory / name)
        shards.append({"file": name, "num_tokens": len(piece), "num_documents": int((piece == eos_token_id).sum()),
                       "doc_offsets": f"shard-{i:05d}.docs.bin"})
    index = {"format": "lmstack-tokens-v1", "dtype": dtype, "vocab_size": vocab_size, "eos_token_id": eos_token_id,
             "tokenizer_sha256": "test", "num_tokens": len(tokens),
             "num_documents": sum(s["num_documents"] for s in shards), "shards": shards}
    (directory / "index.json").write_text(json.dumps(index))


def write_char_dataset(out: Path, text: str, val_fraction: float = 0.1, shard_tokens: int = 1 << 20) -> Path:
    """nanoGPT's shakespeare_char preparation: sorted characters as the vocabulary, the first 90% of
    characters train and the last 10% val. Returns `out`."""
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    ids = np.array([lookup[c] for c in text], dtype=np.int64)
    n_train = int(len(ids) * (1 - val_fraction))
    vocab = len(chars) + 1  # one more id for EOS, as the format requires one
    write_split(out / "train", ids[:n_train], vocab, len(chars), shard_tokens)
    write_split(out / "val", ids[n_train:], vocab, len(chars), shard_tokens)
    (out / "tokenizer").mkdir(exist_ok=True)
    (out / "tokenizer" / "chars.json").write_text(json.dumps(chars))
    return out


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """A small synthetic corpus with learnable structure (repeated phrases), in several shards."""
    rng = np.random.default_rng(0)
    phrases = [rng.integers(0, 60, size=rng.integers(5, 15)) for _ in range(20)]
    docs = [np.concatenate([phrases[i] for i in rng.integers(0, 20, size=8)] + [np.array([63])]) for _ in range(300)]
    tokens = np.concatenate(docs)
    data = tmp_path / "data"
    n_val = len(tokens) // 10
    write_split(data / "train", tokens[:-n_val], 64, 63, shard_tokens=5000)
    write_split(data / "val", tokens[-n_val:], 64, 63, shard_tokens=5000)
    return data

