"""Preference data: reading (pairs, HH dialogues, unpaired, prompts), rendering with the chat template and
prompt masks, the counted skips, collation, and the step-pure batch order."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from lmstack.data.preference import (EncodedPair, ExampleBatches, PreferencePair, Renderer, collate_pairs,
                                     collate_unpaired, parse_hh_dialogue, read_pairs, read_prompts, read_unpaired)
from lmstack.errors import DataError


@pytest.fixture(scope="module")
def chat_tokenizer():
    import pydoc_data.topics

    from lmstack.tokenizer import train_tokenizer
    return train_tokenizer(iter(list(pydoc_data.topics.topics.values())[:30]), "bpe", 400)  # ChatML template


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_hh_dialogues_on_the_real_file(shared_data):
    path = shared_data / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"
    pairs = read_pairs(path)
    assert len(pairs) == 2312
    first = pairs[0]
    assert [m["role"] for m in first.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert first.prompt[0]["content"] == "what are some pranks with a pen i can do?"
    assert first.chosen[0]["content"].startswith("No, sorry!") and first.chosen[0]["role"] == "assistant"
    assert first.rejected[0]["content"].startswith("There are lots of funny things")
    assert first.source.endswith("test.jsonl.gz:1")
    with gzip.open(path, "rt") as f:
        raw = json.loads(f.readline())
    assert parse_hh_dialogue(raw["chosen"])[-1] == first.chosen[0]


def test_chat_rendering_masks_the_prompt_and_ends_at_the_turn_marker(chat_tokenizer):
    renderer = Renderer(chat_tokenizer, max_len=512)
    assert renderer.chat
    pair = PreferencePair([{"role": "user", "content": "Say hi"}], "Hello there!", "Go away.")
    [encoded], stats = renderer.encode_pairs([pair])
    end = chat_tokenizer.token_to_id("<|im_end|>")
    prompt_text = chat_tokenizer.decode(encoded.prompt)
    assert prompt_text == "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
    assert chat_tokenizer.decode(encoded.chosen) == "Hello there!<|im_end|>"  # the end-of-turn marker is trained
    assert encoded.chosen[-1] == end and encoded.rejected[-1] == end
    batch = collate_pairs([encoded], pad_id=chat_tokenizer.pad_token_id)
    scored = batch["targets"][0][batch["targets"][0] != -100]
    assert scored.tolist() == encoded.chosen  # targets: exactly the completion, nothing of the prompt
    assert stats.kept == 1


def test_chat_rendering_agrees_with_trl_tokenisation(chat_tokenizer, tmp_path):
    """trl's DPO tokenisation of a conversational pair gives the same prompt and the same answer tokens; trl also
    keeps the template's separator after the end-of-turn marker, which the policy never samples (we leave it out)."""
    transformers = pytest.importorskip("transformers")
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    chat_tokenizer.save(tmp_path / "tok")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    prompt = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
              {"role": "user", "content": "And 3+3?"}]
    chosen, rejected = [{"role": "assistant", "content": "6"}], [{"role": "assistant", "content": "Seven."}]
    theirs = {k: dpo_trainer._tokenize(hf_tok, m, **kw)["input_ids"] for k, m, kw in [
        ("prompt", prompt, {"add_generation_prompt": True}), ("chosen", prompt + chosen, {}),
        ("rejected", prompt + rejected, {})]}
    [ours], _ = Renderer(chat_tokenizer, 512).encode_pairs([PreferencePair(prompt, chosen, rejected)])
    assert ours.prompt == theirs["prompt"]
    separator = chat_tokenizer.encode("\n")
    assert ours.chosen + separator == theirs["chosen"][len(theirs["prompt"]):]
    assert ours.rejected + separator == theirs["rejected"][len(theirs["prompt"]):]


def test_text_rendering_appends_eos(chat_tokenizer):
    renderer = Renderer(chat_tokenizer, max_len=64, format="text")
    [encoded], _ = renderer.encode_pairs([PreferencePair("2+2=", "4", "5")])
    assert encoded.prompt == chat_tokenizer.encode("2+2=")
    assert encoded.chosen == chat_tokenizer.encode("4") + [chat_tokenizer.eos_token_id]
    hh = PreferencePair([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "hello"}],
                        [{"role": "assistant", "content": "bye"}])
    [encoded], _ = renderer.encode_pairs([hh])
    assert chat_tokenizer.decode(encoded.prompt) == "\n\nHuman: hi\n\nAssistant:"  # HH-style without a template
    assert chat_tokenizer.decode(encoded.chosen[:-1]) == " hello"


def test_bad_pairs_are_skipped_and_counted(chat_tokenizer):
    renderer = Renderer(chat_tokenizer, max_len=24, format="text")
    long_prompt = "word " * 40
    pairs = [PreferencePair("q", "same", "same", "f:1"), PreferencePair("q", "  ", "x", "f:2"),
             PreferencePair(long_prompt, "a", "b", "f:3"), PreferencePair("q", "fine", "also fine", "f:4"),
             PreferencePair("q", "a " * 30, "b", "f:5")]
    encoded, stats = renderer.encode_pairs(pairs)
    assert stats.skipped == {"identical": 1, "empty_completion": 1, "prompt_too_long": 1}
    assert stats.truncated == 1 and stats.kept == 2 == len(encoded)
    assert [e.index for e in encoded] == [0, 1]
    assert max(len(e.prompt) + len(e.chosen) for e in encoded) <= 24
    summary = stats.summary()
    assert "identical (first: f:1)" in summary and "empty (first: f:2)" in summary and "max_len (first: f:5)" in summary


def test_malformed_records_name_file_and_line(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, "{not json"])
    with pytest.raises(DataError, match=r"p\.jsonl:2: not valid JSON"):
        read_pairs(path)
    path = _write(tmp_path / "q.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(DataError, match=r"q\.jsonl:1: .*needs 'chosen' and 'rejected'"):
        read_pairs(path)
    path = _write(tmp_path / "r.jsonl", [{"prompt": "a", "chosen": 3, "rejected": "c"}])
    with pytest.raises(DataError, match=r"r\.jsonl:1: 'chosen' must be text or a list"):
        read_pairs(path)
    path = _write(tmp_path / "s.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: x\n\nAssistant: y",
                                          "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: z\n\nAssistant: y"}])
    with pytest.raises(DataError, match=r"s\.jsonl:1: the dialogues differ at a 'user' turn"):
        read_pairs(path)


def test_unpaired_and_prompt_records(tmp_path):
    path = _write(tmp_path / "u.jsonl", [{"prompt": "a", "completion": "b", "label": True},
                                         {"prompt": "c", "chosen": "d", "rejected": "e"}])
    examples = read_unpaired(path)
    assert [(e.completion, e.label) for e in examples] == [("b", True), ("d", True), ("e", False)]
    bad = _write(tmp_path / "v.jsonl", [{"prompt": "a", "completion": "b", "label": "yes"}])
    with pytest.raises(DataError, match="v.jsonl:1"):
        read_unpaired(bad)
    prompts = read_prompts(_write(tmp_path / "g.jsonl", [{"question": "1+1?", "answer": "#### 2"}]), "question")
    assert prompts[0].prompt == "1+1?" and prompts[0].fields == {"answer": "#### 2"}


def test_kto_batches_pair_each_prompt_with_the_previous_completion():
    from lmstack.data.preference import EncodedExample
    examples = [EncodedExample([1, 2], [3], True, 0), EncodedExample([4], [5, 6], False, 1),
                EncodedExample([7], [8], True, 2)]
    batch = collate_unpaired(examples, pad_id=0)
    assert batch["labels"].tolist() == [True, False, True]
    rows = [r[m.bool()].tolist() for r, m in zip(batch["kl_input_ids"], batch["kl_attention_mask"])]
    assert rows == [[1, 2, 8], [4, 3], [7, 5, 6]]


def test_batches_are_a_pure_function_of_the_step_and_cover_every_example():
    examples = [EncodedPair([1], [2], [3], i) for i in range(10)]
    source = ExampleBatches(examples, lambda items: collate_pairs(items, 0), batch_size=2, grad_accum=2, seed=3)
    again = ExampleBatches(examples, lambda items: collate_pairs(items, 0), batch_size=2, grad_accum=2, seed=3)
    for step in (0, 3, 7):
        for a, b in zip(source.micro_batches(step), again.micro_batches(step)):
            assert torch.equal(a["index"], b["index"])
    first_epoch = sorted(i for step in range(2) for i in source.indices(step)) + source.indices(2)[:2]
    assert sorted(first_epoch) == list(range(10))
    ranks = [ExampleBatches(examples, lambda items: collate_pairs(items, 0), 2, 1, 3, rank, 2).indices(1)
             for rank in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
