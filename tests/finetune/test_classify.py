"""Encoder fine-tuning for sequence classification (`lmstack finetune` with task: classification): the written
checkpoints against transformers (full: BertForSequenceClassification) and peft (LoRA: a SEQ_CLS adapter),
and the data errors a user meets (file:line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmstack.cli import main as cli_main
from lmstack.data.classify import ClassifyDataConfig
from lmstack.errors import ConfigError, DataError
from lmstack.tokenizer import train_tokenizer
from lmstack.train.config import OptimConfig, ScheduleConfig, TrainConfig
from lmstack.train.recipes.classify import ClassifyConfig, build_engine

WORDS = {"red": "colour", "green": "colour", "blue": "colour", "cat": "animal", "dog": "animal", "cow": "animal",
         "one": "number", "two": "number", "six": "number"}
FILLER = ["the", "a", "some", "very", "small", "big", "old", "new"]


def _records(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    words, out = list(WORDS), []
    for _ in range(n):
        key = words[torch.randint(len(words), (1,), generator=g).item()]
        fill = [FILLER[i] for i in torch.randint(len(FILLER), (3,), generator=g).tolist()]
        out.append({"text": " ".join(fill[:2] + [key] + fill[2:]), "label": WORDS[key]})
    return out


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory) -> Path:
    """A tiny random BertModel (with pooler) saved by transformers, plus a WordPiece tokenizer trained here."""
    import transformers

    directory = tmp_path_factory.mktemp("bert") / "base"
    text = " ".join(list(WORDS) + FILLER) + " pair of texts"
    tokenizer = train_tokenizer(iter([text] * 20), "wordpiece", 120)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     pad_token_id=tokenizer.pad_token_id)
    transformers.BertModel(config).eval().save_pretrained(directory)
    tokenizer.save(directory)
    return directory


def _config(base: Path, out: Path, data: Path, method: str, steps: int = 8) -> ClassifyConfig:
    return ClassifyConfig(out_dir=str(out), model=str(base), method=method,
                          data=ClassifyDataConfig(train=[str(data)], val_fraction=0.25),
                          optim=OptimConfig(lr=3e-3 if method == "lora" else 1e-3, weight_decay=0.0),
                          schedule=ScheduleConfig(warmup_steps=1),
                          train=TrainConfig(steps=steps, batch_size=8, seq_len=32, eval_every=4, progress=False,
                                            peak_flops=1e12))  # no peak measurement: a few seconds less


def _probe(engine) -> dict[str, torch.Tensor]:
    """A padded batch (with token types) from the validation set."""
    return engine.val_batches[0]


def test_full_finetune_writes_what_transformers_loads(bert_base, tmp_path):
    import transformers

    data = _jsonl(tmp_path / "train.jsonl", _records(64, 0))
    engine = build_engine(_config(bert_base, tmp_path / "run", data, "full"))
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    result = engine.fit()
    assert any(not torch.equal(before[k], v) for k, v in engine.model.state_dict().items())
    checkpoint = Path(result.checkpoint)
    hf_config = json.loads((checkpoint / "config.json").read_text())
    assert hf_config["architectures"] == ["BertForSequenceClassification"]
    assert hf_config["id2label"] == {"0": "animal", "1": "colour", "2": "number"}  # names in sorted order
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    batch, model = _probe(engine), engine.model.eval()
    with torch.no_grad():
        ours = model.classify(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        theirs = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"]).logits
    assert (ours - theirs).abs().max() <= 1e-5
    evals = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8] and all(0.0 <= r["val_accuracy"] <= 1.0 for r in evals)
    assert not any("val_ppl" in r for r in evals)  # exp(label cross-entropy) is no perplexity
    # the logged accuracy is the checkpoint's accuracy on the validation rows
    correct = sum((model.classify(b["input_ids"], b["attention_mask"], b["token_type_ids"]).argmax(-1)
                   == b["labels"]).sum().item() for b in engine.val_batches)
    assert evals[-1]["val_accuracy"] == pytest.approx(correct / sum(len(b["labels"]) for b in engine.val_batches))


def test_lora_adapter_loads_in_peft_with_the_same_logits(bert_base, tmp_path):
    import peft
    import transformers

    records = _records(48, 1)
    for r in records[::3]:  # text pairs: segment B, token type 1
        r["text_pair"] = "pair of texts"
    data = _jsonl(tmp_path / "train.jsonl", records)
    engine = build_engine(_config(bert_base, tmp_path / "run", data, "lora", steps=6))
    trainable = {n for n, p in engine.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    result = engine.fit()
    adapter = json.loads((Path(result.checkpoint) / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and adapter["modules_to_save"] == ["classifier"]
    assert sorted(adapter["target_modules"]) == [f"bert.encoder.layer.{i}.attention.self.{m}"
                                                 for i in range(2) for m in ("query", "value")]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(bert_base, num_labels=3)
    reference = peft.PeftModel.from_pretrained(base, result.checkpoint).eval()
    batch = next(b for b in engine.val_batches if b["token_type_ids"].any())
    model = engine.model.eval()
    with torch.no_grad():
        ours = model.classify(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        theirs = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"]).logits
    assert (ours - theirs).abs().max() <= 1e-5
    with torch.no_grad(), reference.disable_adapter():  # and the adapter matters: without it the logits differ
        plain = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          token_type_ids=batch["token_type_ids"]).logits
    assert (plain - theirs).abs().max() > 1e-3


def test_bad_records_name_the_line(bert_base, tmp_path):
    data = _jsonl(tmp_path / "bad.jsonl", [{"text": "a red cat", "label": 0}, {"text": "one dog", "label": 1},
                                           {"text": "big cow", "label": 5}])
    cfg = _config(bert_base, tmp_path / "run", data, "full")
    cfg.num_labels = 2
    with pytest.raises(DataError, match=r"bad\.jsonl:3: label 5 is outside 0\.\.1"):
        build_engine(cfg)
    missing = _jsonl(tmp_path / "missing.jsonl", [{"text": "a red cat", "label": "colour"}, {"label": "animal"}])
    with pytest.raises(DataError, match=r"missing\.jsonl:2: the record has no 'text' field"):
        build_engine(_config(bert_base, tmp_path / "run2", missing, "full"))
    unknown = _jsonl(tmp_path / "val.jsonl", [{"text": "a red cat", "label": "plant"}])
    cfg = _config(bert_base, tmp_path / "run3", _jsonl(tmp_path / "ok.jsonl", _records(16, 2)), "full")
    cfg.data.val = [str(unknown)]
    with pytest.raises(DataError, match=r"val\.jsonl:1: label 'plant' is not a known label name"):
        build_engine(cfg)


def test_cli_dispatches_on_task(bert_base, tmp_path, capsys):
    data = _jsonl(tmp_path / "train.jsonl", _records(24, 3))
    code = cli_main(["finetune", "--task=classification", f"--model={bert_base}", f"--data.train=[{data}]",
                     f"--out_dir={tmp_path / 'run'}", "--train.steps=2", "--train.batch_size=4",
                     "--train.seq_len=32", "--train.progress=false", "--train.peak_flops=1e12"])
    assert code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["task"] == "classification" and line["steps"] == 2 and 0.0 <= line["val_accuracy"] <= 1.0
    with pytest.raises(ConfigError, match="decoder|encoder"):  # a decoder base is refused by name
        from lmstack.train.recipes.classify import classifier_model
        classifier_model("llama-tiny", 2, None)


def test_shipped_classification_configs_load():
    from lmstack.schema import load_config

    paths = sorted((Path(__file__).resolve().parents[2] / "configs").glob("classify-*.yaml"))
    assert paths
    for path in paths:
        cfg = load_config(ClassifyConfig, path)
        assert cfg.task == "classification" and cfg.data.train


def test_lora_from_an_lmstack_masked_lm_run_trains_and_saves_the_new_pooler(bert_base, tmp_path):
    """A base without a pooler (an `lmstack pretrain --objective=mlm` checkpoint: BertForMaskedLM): the pooler is new,
    so LoRA trains it in full and the adapter carries it; peft on transformers' model of that base agrees."""
    import peft
    import transformers

    import lmstack
    from lmstack.model.encoder import Encoder
    from lmstack.tokenizer import Tokenizer

    trunk = lmstack.load_model(bert_base)
    masked = Encoder(trunk.config.replace(heads=["mlm"], pooler=False))
    masked.load_state_dict({k: v for k, v in trunk.state_dict().items() if not k.startswith("bert.pooler.")},
                           strict=False)
    base = tmp_path / "mlm-run"
    lmstack.save_model(masked, base, extra_files=Tokenizer.load(bert_base).files())
    data = _jsonl(tmp_path / "train.jsonl", _records(32, 4))
    engine = build_engine(_config(base, tmp_path / "run", data, "lora", steps=3))
    result = engine.fit()
    adapter = json.loads((Path(result.checkpoint) / "adapter_config.json").read_text())
    assert sorted(adapter["modules_to_save"]) == ["bert.pooler.dense", "classifier"]
    hf_base = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
    reference = peft.PeftModel.from_pretrained(hf_base, result.checkpoint).eval()
    batch, model = engine.val_batches[0], engine.model.eval()
    with torch.no_grad():
        ours = model.classify(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        theirs = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"]).logits
    assert (ours - theirs).abs().max() <= 1e-5
