"""Real text: Blake's "Poems" and "Songs" share many stanzas. The documents `prepare` keeps must be
exactly those a plain-Python greedy dedup keeps (exact copies, then Jaccard >= 0.8 on word 5-gram sets)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import tokenizers

from lmstack.data.clean import QualityConfig, QualityFilter, normalize
from lmstack.data.ingest import IngestStats, read_documents
from lmstack.data.pipeline import PrepareConfig, prepare
from lmstack.schema import from_dict


def _grams(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + 5]) for i in range(max(len(words) - 4, 1))}


def test_blake_dedup_matches_a_plain_python_greedy_reference(shared_data: Path, tmp_path: Path) -> None:
    books = [shared_data / "gutenberg_nltk" / "blake-poems.txt", shared_data / "gutenberg_nltk" / "blake-songs.txt"]
    quality = {"min_words": 10, "min_punct_line_fraction": None}
    out = tmp_path / "out"
    report = prepare(from_dict(PrepareConfig, {
        "inputs": [str(b) for b in books], "text_unit": "paragraph", "train_tokenizer": "bpe:600",
        "output": str(out), "quality": quality, "val_fraction": 0.0, "workers": 2}))

    # reference: the same paragraphs and filters, then a greedy keep-first dedup written from the definition
    qf = QualityFilter(QualityConfig(**quality))
    texts = [normalize(d.text) for d in read_documents(books, IngestStats(), text_unit="paragraph")]
    texts = [t for t in texts if qf.first_failure(t) is None]
    kept: list[str] = []
    kept_keys: set[str] = set()
    kept_grams: list[set[tuple[str, ...]]] = []
    exact = near = 0
    for text in texts:
        key = " ".join(text.casefold().split())
        if key in kept_keys:
            exact += 1
            continue
        g = _grams(text)
        if any(len(g & h) / len(g | h) >= 0.8 for h in kept_grams):
            near += 1
            continue
        kept.append(text)
        kept_keys.add(key)
        kept_grams.append(g)
    assert exact > 50 and near > 20  # the two books really overlap
    assert (report["dedup"]["exact_removed"], report["dedup"]["near_removed"]) == (exact, near)

    index = json.loads((out / "train" / "index.json").read_text())
    ref = tokenizers.Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    decoded = []
    for shard in index["shards"]:
        tokens = np.memmap(out / "train" / shard["file"], dtype=index["dtype"], mode="r")
        bounds = [*np.fromfile(out / "train" / shard["doc_offsets"], dtype="<u8").tolist(), len(tokens)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            assert tokens[b - 1] == index["eos_token_id"]
            decoded.append(ref.decode(tokens[a:b - 1].tolist(), skip_special_tokens=False))
    assert decoded == kept
