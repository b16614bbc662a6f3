"""Masked-LM / next-sentence and span-corruption batches, their objectives, and `lmstack pretrain` with
`objective: mlm | mlm+nsp | span` (and a mixture of experts under the causal objective)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lmstack
from lmstack.data.loader import TokenStream
from lmstack.data.mlm import MaskedLMBatches, MaskingConfig, continues_word
from lmstack.data.span import SpanCorruptionBatches, span_lengths, window_length
from lmstack.schema import from_dict
from lmstack.tokenizer import Tokenizer, train_tokenizer
from lmstack.train.config import PretrainConfig
from lmstack.train.metrics import read_metrics
from lmstack.train.objectives.mlm import mlm_loss
from lmstack.train.recipes.pretrain import build_engine
from tests.train.conftest import write_split

WORDS = ("the cat dog sat ran on under mat house garden quickly slowly happy yellow green big small "
         "unbelievable extraordinary photosynthesis").split()


@pytest.fixture
def wordpiece_data(tmp_path: Path) -> Path:
    """Sentences of a small vocabulary, a WordPiece tokenizer trained on them, shards as `data prepare` writes."""
    rng = np.random.default_rng(0)
    docs = [" ".join(" ".join(rng.choice(WORDS, size=rng.integers(4, 9))) + "." for _ in range(rng.integers(2, 5)))
            for _ in range(400)]
    tok = train_tokenizer(iter(docs), "wordpiece", vocab_size=120)
    data = tmp_path / "data"
    tok.save(data / "tokenizer")
    eos = tok.eos_token_id
    ids = np.concatenate([np.array(tok.encode(d) + [eos]) for d in docs])
    n_val = len(ids) // 10
    write_split(data / "train", ids[:-n_val], tok.vocab_size, eos, shard_tokens=3000)
    write_split(data / "val", ids[-n_val:], tok.vocab_size, eos, shard_tokens=3000)
    return data


def _source(data: Path, **kw) -> MaskedLMBatches:
    tok = Tokenizer.load(data / "tokenizer")
    return MaskedLMBatches(TokenStream(data / "train"), tok, **{"seq_len": 32, "batch_size": 8, **kw})


def test_mlm_rows_mask_15_percent_80_10_10(wordpiece_data):
    source = _source(wordpiece_data, batch_size=64)
    tok = Tokenizer.load(wordpiece_data / "tokenizer")
    batch = source.micro_batches(0)[0]
    ids, labels = batch["input_ids"], batch["labels"]
    assert (ids[:, 0] == tok.cls_token_id).all() and (ids[:, -1] == tok.sep_token_id).all()
    masked = labels != -100
    ordinary = ~torch.isin(labels.where(masked, ids), torch.tensor(tok.all_special_ids))
    assert masked.sum(1).float().mean().item() == pytest.approx(0.15 * ordinary.sum(1).float().mean().item(), rel=0.1)
    assert not torch.isin(labels[masked], torch.tensor(tok.all_special_ids)).any()  # specials are never chosen
    as_mask = (ids[masked] == tok.mask_token_id).float().mean().item()
    kept = (ids[masked] == labels[masked]).float().mean().item()
    assert as_mask == pytest.approx(0.8, abs=0.06) and kept == pytest.approx(0.1, abs=0.05)
    # a pure function of (seed, step), split over ranks by row
    again = source.micro_batches(0)[0]
    assert torch.equal(again["input_ids"], ids)
    halves = [_source(wordpiece_data, batch_size=32, rank=r, world_size=2).micro_batches(0)[0] for r in (0, 1)]
    assert torch.equal(torch.cat([h["labels"] for h in halves]), labels)


def test_nsp_pairs_continue_or_come_from_elsewhere(wordpiece_data):
    source = _source(wordpiece_data, batch_size=64, nsp=True)
    stream = source.stream.read(0, len(source.stream))
    batch = source.micro_batches(3)[0]
    labels = batch["next_sentence_label"]
    assert 0.3 < labels.float().mean().item() < 0.7
    original = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    elsewhere = 0
    for row in range(12):
        types = batch["token_type_ids"][row]
        a = original[row, 1:int((types == 0).sum()) - 1].numpy()
        b = original[row, int((types == 0).sum()):-1].numpy()
        joined = np.concatenate([a, b])
        windows = np.lib.stride_tricks.sliding_window_view(stream, len(joined))
        contiguous = bool((windows == joined).all(1).any())
        if labels[row].item() == 0:
            assert contiguous  # B is the text right after A
        else:
            elsewhere += not contiguous
    assert elsewhere > 0


def test_whole_word_masking_masks_every_piece_of_a_word(wordpiece_data):
    tok = Tokenizer.load(wordpiece_data / "tokenizer")
    source = _source(wordpiece_data, batch_size=32, masking=MaskingConfig(whole_word=True))
    cont = torch.from_numpy(continues_word(tok))
    batch = source.micro_batches(1)[0]
    original = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    masked = batch["labels"] != -100
    special = torch.isin(original, torch.tensor(tok.all_special_ids))
    pieces = cont[original][:, 1:] & ~special[:, :-1]  # ## pieces after an ordinary piece (a row may start mid-word)
    assert pieces.any()
    # a ## piece is chosen exactly when the piece before it is
    assert torch.equal(masked[:, 1:][pieces], masked[:, :-1][pieces])


def test_mlm_nsp_loss_equals_transformers_pretraining_loss(wordpiece_data, tmp_path):
    import transformers

    batch = _source(wordpiece_data, nsp=True).micro_batches(0)[0]
    model = lmstack.load_model("bert-tiny", vocab_size=120, heads=["mlm", "nsp"], dropout=0.0,
                               attention_dropout=0.0).eval()
    lmstack.save_model(model, tmp_path / "b")
    reference = transformers.BertForPreTraining.from_pretrained(tmp_path / "b", dtype=torch.float32).eval()
    with torch.no_grad():
        loss = mlm_loss(model, batch)
        expected = reference(**{k: v for k, v in batch.items()}).loss
    assert loss.mean().item() == pytest.approx(expected.item(), rel=1e-5)
    assert int(loss.count) == int((batch["labels"] != -100).sum())


def test_span_corruption_rows_hide_spans_behind_sentinels(wordpiece_data):
    tok = Tokenizer.load(wordpiece_data / "tokenizer")
    stream = TokenStream(wordpiece_data / "train")
    source = SpanCorruptionBatches(stream, tok, seq_len=48, batch_size=4)
    assert window_length(512, 0.15, 3.0) == (568, 114)  # T5's compute_input_and_target_lengths
    rng = np.random.default_rng(5)
    window = stream.read(100, source.window)
    inputs, targets = source.corrupt(window, rng)
    assert len(inputs) == 48 and inputs[-1] == targets[-1] == stream.info.eos_token_id
    noise, spans = span_lengths(source.window, 0.15, 3.0)
    sentinels = source.sentinels
    assert len(targets) == noise + spans + 1
    assert sentinels[0] == tok.vocab_size + 99 and source.vocab_size == tok.vocab_size + 100  # above the vocab
    # put the spans back where their sentinels are: the window again
    spans_of = {}
    current = None
    for t in targets[:-1]:
        if t in sentinels:
            current = t
            spans_of[t] = []
        else:
            spans_of[current].append(t)
    rebuilt = np.concatenate([spans_of[t] if t in spans_of else [t] for t in inputs[:-1]])
    assert np.array_equal(rebuilt, window)
    batch = source.micro_batches(0)[0]
    assert batch["input_ids"].shape == (4, 48) and (batch["labels"] >= 0).sum() == 4 * (noise + spans + 1)


def _run(data: Path, out: Path, objective: str, model: dict, steps: int = 3, **train):
    cfg = from_dict(PretrainConfig, {"out_dir": str(out), "objective": objective, "model": model,
                                     "data": {"path": str(data)},
                                     "train": {"steps": steps, "batch_size": 4, "seq_len": 32, "eval_every": 0,
                                               "progress": False, "peak_flops": 1e9, "eval_windows": 8, **train},
                                     "optim": {"lr": 1e-3}})
    return build_engine(cfg).fit(), cfg


@pytest.mark.parametrize("objective,cls_name", [("mlm+nsp", "BertForPreTraining"),
                                                 ("span", "T5ForConditionalGeneration")])
def test_pretrain_recipe_trains_loads_in_transformers_and_resumes(objective, cls_name, wordpiece_data, tmp_path):
    import transformers

    preset = "bert-tiny" if objective != "span" else "t5-tiny"
    result, cfg = _run(wordpiece_data, tmp_path / "run", objective, {"preset": preset, "num_layers": 1}, steps=2)
    assert np.isfinite(result.final_loss) and np.isfinite(result.val_loss)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train_records = [r for r in records if r["kind"] == "train"]
    if objective == "mlm+nsp":
        assert 0.0 <= train_records[-1]["nsp_accuracy"] <= 1.0 and "mlm_accuracy" in train_records[-1]
    checkpoint = result.checkpoint
    assert json.loads((checkpoint / "config.json").read_text())["architectures"] == [cls_name]
    getattr(transformers, cls_name).from_pretrained(checkpoint)  # transformers opens the checkpoint as is
    assert (checkpoint / "tokenizer.json").exists()
    cfg.train.steps = 3
    resumed = build_engine(cfg, resume=True).fit()
    assert resumed.steps == 3


def test_pretrain_a_mixture_of_experts_logs_expert_shares(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 60, size=20000)
    write_split(tmp_path / "d" / "train", tokens, 64, 63, shard_tokens=5000)
    result, _ = _run(tmp_path / "d", tmp_path / "moe", "clm", {"preset": "mixtral-tiny"}, steps=2)
    record = [r for r in read_metrics(tmp_path / "moe" / "metrics.jsonl") if r["kind"] == "train"][-1]
    shares = [record[f"moe_tokens_e{e}"] for e in range(4)]
    assert sum(shares) == pytest.approx(2.0, rel=1e-4) and record["moe_aux_loss"] > 0
    assert lmstack.load_model(result.checkpoint).config.moe.num_experts == 4


def test_sequence_classification_loss_equals_transformers(tmp_path):
    import transformers

    from lmstack.train.objectives.classification import sequence_classification_loss

    model = lmstack.load_model("bert-tiny", vocab_size=120, heads=["classifier"], num_labels=3).eval()
    lmstack.save_model(model, tmp_path / "c")
    reference = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "c", dtype=torch.float32).eval()
    batch = {"input_ids": torch.randint(5, 120, (4, 9)), "attention_mask": torch.ones(4, 9, dtype=torch.long),
             "labels": torch.tensor([0, 2, 1, 2])}
    batch["attention_mask"][1, 6:] = 0
    with torch.no_grad():
        loss = sequence_classification_loss(model, batch)
        expected = reference(**batch).loss
    assert loss.mean().item() == pytest.approx(expected.item(), rel=1e-5) and loss.count == 4
