"""Masked-language-model batches (BERT pretraining) from `lmstack data prepare` token shards.

Each row is `[CLS] A [SEP]` (MLM) or `[CLS] A [SEP] B [SEP]` (MLM + next-sentence prediction) cut from
the token stream (documents are separated there by the tokenizer's eos, [SEP] for WordPiece). For NSP,
B is the text that follows A in the stream (label 0, "is next") or, half the time, text from a random
other place (label 1), as in BERT. Then 15% of the ordinary tokens are chosen for prediction: 80% of
them become [MASK], 10% a random token, 10% stay; `labels` holds the original id there and -100
elsewhere. With whole-word masking the choice is by word: a WordPiece `##` piece (or, for BPE /
SentencePiece vocabularies, a piece without a leading space marker) goes with the word it continues.

Like the causal-LM loader, a batch is a pure function of (seed, step) and is split over ranks by row:
row r of step s is built from a generator seeded with (seed, s, r), so resume and DDP are exact.

Shapes: B rows per micro-batch, T tokens per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmstack.data.loader import SeededRowBatches, TokenStream
from lmstack.errors import DataError
from lmstack.tokenizer import Tokenizer

IGNORE_INDEX = -100


@dataclass
class MaskingConfig:
    """How tokens are hidden for masked-LM pretraining (BERT's defaults)."""

    probability: float = 0.15  # share of ordinary tokens the model predicts
    mask_fraction: float = 0.8  # of those: replaced by [MASK]
    random_fraction: float = 0.1  # ... by a random token (the rest stay as they are)
    whole_word: bool = False  # choose whole words, not pieces


@dataclass
class SpecialIds:
    cls: int
    sep: int
    mask: int
    pad: int


def special_ids(tokenizer: Tokenizer, source: str) -> SpecialIds:
    """[CLS], [SEP], [MASK] and [PAD] ids (or the tokenizer's bos / eos / mask / pad roles)."""
    ids = {"cls": tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id,
           "sep": tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id,
           "mask": tokenizer.mask_token_id, "pad": tokenizer.pad_token_id}
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise DataError(f"{source}: masked-LM pretraining needs {', '.join(missing)} tokens in the tokenizer "
                        "(a wordpiece tokenizer has [CLS] [SEP] [MASK] [PAD]: `--train-tokenizer wordpiece:N`)")
    return SpecialIds(**ids)


def continues_word(tokenizer: Tokenizer) -> np.ndarray:
    """(V,) bool: True for a piece that continues the previous one's word (WordPiece `##`, or no space marker)."""
    size = tokenizer.vocab_size
    pieces = [tokenizer.id_to_token(i) or "" for i in range(size)]
    if tokenizer.model_type == "WordPiece":
        return np.array([p.startswith("##") for p in pieces])
    special = set(tokenizer.all_special_ids)
    return np.array([not p.startswith(("Ġ", "▁", " ")) and i not in special for i, p in enumerate(pieces)])


class MaskedLMBatches(SeededRowBatches):
    """Masked-LM (and optionally NSP) micro-batches: dicts of input_ids, attention_mask, token_type_ids, labels
    (B, T) and, with NSP, next_sentence_label (B,)."""

    def __init__(self, stream: TokenStream, tokenizer: Tokenizer, seq_len: int, batch_size: int,
                 grad_accum: int = 1, seed: int = 0, rank: int = 0, world_size: int = 1, nsp: bool = False,
                 masking: MaskingConfig | None = None):
        self.specials = special_ids(tokenizer, str(stream.directory))
        budget = seq_len - (3 if nsp else 2)
        if budget < 2 or len(stream) < 2 * seq_len:
            raise DataError(f"{stream.directory}: {len(stream)} tokens and seq_len {seq_len}: too little for "
                            "masked-LM rows (need seq_len >= 5 and two rows' worth of tokens)")
        self.stream, self.seq_len, self.budget = stream, seq_len, budget
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.rank, self.world_size, self.nsp = rank, world_size, nsp
        self.masking = masking or MaskingConfig()
        special = np.zeros(tokenizer.vocab_size, dtype=bool)
        special[tokenizer.all_special_ids] = True
        self.special = special  # never masked, never drawn as a random replacement
        self.ordinary = np.flatnonzero(~special)
        self.continues = continues_word(tokenizer) if self.masking.whole_word else None

    def collate(self, rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        return collate(rows, self.specials.pad)

    # ------------------------------------------------------------------------------------------- one row
    def row(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        s, n = self.specials, len(self.stream)
        start = int(rng.integers(0, n - self.budget))
        if not self.nsp:
            ids = np.concatenate([[s.cls], self.stream.read(start, self.budget), [s.sep]])
            types = np.zeros(len(ids), dtype=np.int64)
            label = None
        else:
            a_len = int(rng.integers(1, self.budget))
            b_len = self.budget - a_len
            a = self.stream.read(start, a_len)
            label = int(rng.random() < 0.5)  # 0: B is the text after A; 1: B comes from elsewhere
            b_start = start + a_len if not label else int(rng.integers(0, n - b_len))
            b = self.stream.read(b_start, b_len)
            ids = np.concatenate([[s.cls], a, [s.sep], b, [s.sep]])
            types = np.concatenate([np.zeros(a_len + 2, dtype=np.int64), np.ones(b_len + 1, dtype=np.int64)])
        ids, labels = self.mask(ids, rng)
        out = {"input_ids": ids, "token_type_ids": types, "labels": labels}
        if label is not None:
            out["next_sentence_label"] = np.array(label)
        return out

    def mask(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Choose the positions to predict and corrupt them -> (input ids, labels)."""
        m = self.masking
        candidates = np.flatnonzero(~self.special[ids])
        target = max(1, round(len(candidates) * m.probability))
        if self.continues is None:
            chosen = rng.permutation(candidates)[:target]
        else:  # whole words: group each piece with the word it continues, then take words until the target
            starts = ~self.continues[ids[candidates]] | (np.diff(candidates, prepend=-2) != 1)
            words = np.split(candidates, np.flatnonzero(starts)[1:])
            chosen_words, count = [], 0
            for w in rng.permutation(len(words)):
                if count >= target:
                    break
                if count + len(words[w]) > target + 2:  # BERT skips a word that would overshoot
                    continue
                chosen_words.append(words[w])
                count += len(words[w])
            chosen = np.concatenate(chosen_words) if chosen_words else candidates[:1]
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        labels[chosen] = ids[chosen]
        ids = ids.copy()
        roll = rng.random(len(chosen))
        to_mask = chosen[roll < m.mask_fraction]
        to_random = chosen[(roll >= m.mask_fraction) & (roll < m.mask_fraction + m.random_fraction)]
        ids[to_mask] = self.specials.mask
        ids[to_random] = rng.choice(self.ordinary, size=len(to_random))
        return ids, labels


def collate(rows: list[dict[str, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into (B, T) tensors; labels pad with -100, attention_mask marks the real tokens."""
    T = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": torch.full((len(rows), T), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros(len(rows), T, dtype=torch.long),
             "token_type_ids": torch.zeros(len(rows), T, dtype=torch.long),
             "labels": torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)}
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        batch["input_ids"][i, :n] = torch.from_numpy(r["input_ids"])
        batch["attention_mask"][i, :n] = 1
        batch["token_type_ids"][i, :n] = torch.from_numpy(r["token_type_ids"])
        batch["labels"][i, :n] = torch.from_numpy(r["labels"])
    if "next_sentence_label" in rows[0]:
        batch["next_sentence_label"] = torch.tensor([int(r["next_sentence_label"]) for r in rows])
    return batch


def load_data_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer `lmstack data prepare` stored beside the shards (DIR/tokenizer)."""
    directory = Path(data_dir) / "tokenizer"
    if not (directory / "tokenizer.json").is_file():
        raise DataError(f"{directory}: no tokenizer.json; masked-LM and span-corruption pretraining need the data's "
                        "tokenizer (prepare the data with `lmstack data prepare`)")
    return Tokenizer.load(directory)


__all__ = ["MaskedLMBatches", "MaskingConfig", "collate", "continues_word", "load_data_tokenizer", "special_ids"]
