"""A labelled classification set derived from the Gutenberg books in ../shared/data: which author wrote a passage.

There is no sentiment or NLI data on this machine, so the labels come from the books themselves: a passage is
one paragraph (20 to 80 words, whitespace-joined; the Gutenberg header, footer and any paragraph that mentions
Gutenberg left out) and its label is the author. Three prose authors; validation passages come from books the
training passages never saw where the author has several (so character names do not give the answer away):

    austen      train: austen-emma, austen-sense            validation: austen-persuasion
    chesterton  train: chesterton-ball, chesterton-brown    validation: chesterton-thursday
    melville    train: the first 80% of moby_dick           validation: its last 20%

`--per-author` passages per author in training (a seeded sample), a quarter of that in validation. Writes
OUT/train.jsonl and OUT/val.jsonl ({"text", "label"}) and prints one JSON line of counts.

    python benchmarks/authors_data.py --out data/authors
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

BOOKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "gutenberg_nltk"
SPLITS = {"austen": (["austen-emma", "austen-sense"], ["austen-persuasion"]),
          "chesterton": (["chesterton-ball", "chesterton-brown"], ["chesterton-thursday"]),
          "melville": (["melville-moby_dick:0-0.8"], ["melville-moby_dick:0.8-1"])}


def body(text: str) -> str:
    """The book without Project Gutenberg's header and footer."""
    start = re.search(r"\*\*\* ?START OF TH(E|IS) PROJECT GUTENBERG.*\n", text)
    text = text[start.end():] if start else text
    end = re.search(r"\*\*\* ?END OF TH(E|IS) PROJECT GUTENBERG|End of (the )?Project Gutenberg", text)
    return text[:end.start()] if end else text


def passages(books: Path, spec: str) -> list[str]:
    name, _, span = spec.partition(":")
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body((books / f"{name}.txt").read_text(encoding="latin-1")))]
    paragraphs = [p for p in paragraphs if 20 <= len(p.split()) <= 80 and "gutenberg" not in p.lower()
                  and "etext" not in p.lower()]
    if span:
        lo, hi = (float(x) for x in span.split("-"))
        paragraphs = paragraphs[int(lo * len(paragraphs)):int(hi * len(paragraphs))]
    return paragraphs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--books", type=Path, default=BOOKS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-author", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    counts = {}
    for author, (train_books, val_books) in SPLITS.items():
        for split, specs, n in (("train", train_books, args.per_author), ("val", val_books, args.per_author // 4)):
            pool = [p for spec in specs for p in passages(args.books, spec)]
            chosen = rng.sample(pool, min(n, len(pool)))
            splits[split] += [{"text": text, "label": author} for text in chosen]
            counts[f"{split}_{author}"] = f"{len(chosen)} of {len(pool)}"
    args.out.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        rng.shuffle(records)
        (args.out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print(json.dumps({"bench": "authors_data", "out": str(args.out), **counts}))


if __name__ == "__main__":
    main()
