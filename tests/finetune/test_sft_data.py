"""SFT data: record formats, the assistant-only loss (against transformers' assistant mask), the mistakes
other trainers make (EOS out of the loss, doubled BOS, templates that mark nothing, silent truncation),
bad input, and packing (the packed loss equals the unpacked loss)."""

from __future__ import annotations

import json

import pytest
import torch

from lmstack.config import ModelConfig
from lmstack.data.sft import (
    IGNORE_INDEX,
    SFTBatches,
    SFTDataConfig,
    collate,
    encode,
    encode_records,
    pack,
    read_records,
    sample_tensors,
    to_messages,
)
from lmstack.errors import ChatTemplateError, DataError
from lmstack.model.transformer import Transformer
from lmstack.tokenizer import train_tokenizer
from lmstack.tokenizer.chat_template import LLAMA3
from lmstack.train.objectives.sft import sft_loss
from tests.finetune.conftest import TEXT

transformers = pytest.importorskip("transformers")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "8"}]


def test_every_record_format_becomes_the_same_conversation():
    expected = [{"role": "user", "content": "Add these.\n\n2 3"}, {"role": "assistant", "content": "5"}]
    assert to_messages({"instruction": "Add these.", "input": "2 3", "output": "5"}, "x") == expected
    assert to_messages({"messages": expected}, "x") == expected
    assert to_messages({"conversations": [{"from": "human", "value": "Add these.\n\n2 3"},
                                          {"from": "gpt", "value": "5"}]}, "x") == expected
    assert to_messages({"prompt": "Add these.\n\n2 3", "completion": "5"}, "x") == expected
    assert to_messages({"instruction": "Hi", "input": "", "output": "Hello"}, "x", system="S")[0] == \
        {"role": "system", "content": "S"}


def test_bad_records_name_the_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON"):
        list(read_records(path))
    with pytest.raises(DataError, match=r"x:7: a record needs"):
        to_messages({"question": "?"}, "x:7")
    with pytest.raises(DataError, match=r"x:3: \"output\" must be a string"):
        to_messages({"instruction": "do", "output": None}, "x:3", "alpaca")
    with pytest.raises(DataError, match="no assistant turn"):
        to_messages({"messages": [{"role": "user", "content": "hi"}]}, "x:1")
    with pytest.raises(DataError, match=r"conversations\[0\] has an unknown role"):
        to_messages({"conversations": [{"from": "alien", "value": "hi"}]}, "x:1")
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"instruction": "i", "output": "o"}, {"instruction": "i"}]))
    records = list(read_records(array))
    assert records[1][0].endswith("a.json[1]")


def test_loss_covers_exactly_transformers_assistant_tokens_and_each_end_of_turn(chatml_tokenizer, tmp_path):
    chatml_tokenizer.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    reference = hf.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    sample = encode(chatml_tokenizer, CHAT, "x")
    assert sample.ids == reference["input_ids"] and sample.mask == reference["assistant_masks"]
    _, targets = sample_tensors(sample)
    trained = targets[targets != IGNORE_INDEX].tolist()
    end = chatml_tokenizer.token_to_id("<|im_end|>")
    assert chatml_tokenizer.decode(trained) == "5<|im_end|>8<|im_end|>"
    assert trained.count(end) == 2  # every assistant turn's end marker is a target


def test_eos_stays_in_the_loss_when_pad_is_eos():
    """trl #1623: a collator that masks the pad id also masks EOS when they are equal; ours never looks at pad."""
    tokenizer = train_tokenizer(iter([TEXT]), "char", None, chat_template="llama3")
    tokenizer.special_tokens = type(tokenizer.special_tokens)(bos="<|bos|>", eos="<|eot_id|>", pad="<|eot_id|>",
                                                              unk="<unk>", extra=tokenizer.special_tokens.extra)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    _, targets = sample_tensors(encode(tokenizer, CHAT, "x"))
    assert (targets == tokenizer.eos_token_id).sum() == 2


def test_no_doubled_bos(chatml_tokenizer):
    """alignment-handbook #127: the template writes BOS and encoding with special tokens adds a second one."""
    tokenizer = train_tokenizer(iter([TEXT]), "bpe", 300, chat_template="llama3")
    text = tokenizer.apply_chat_template(CHAT)
    naive = tokenizer.encode(text, add_special_tokens=True)
    assert naive[:2] == [tokenizer.bos_token_id] * 2  # the trap
    sample = encode(tokenizer, CHAT, "x")
    assert sample.ids[0] == tokenizer.bos_token_id and sample.ids[1] != tokenizer.bos_token_id


def test_a_template_that_marks_nothing_or_never_stops_is_an_error():
    tokenizer = train_tokenizer(iter([TEXT]), "char", None)
    tokenizer.chat_template = "{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}{% endif %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="marked no assistant token"):
        encode(tokenizer, CHAT, "f.jsonl:3")
    tokenizer.chat_template = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                               "{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}")
    with pytest.raises(ChatTemplateError, match="never learn to stop"):
        encode(tokenizer, CHAT, "f.jsonl:3")
    tokenizer = train_tokenizer(iter([TEXT]), "char", None, chat_template="llama3")
    tokenizer.chat_template = LLAMA3.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert sum(encode(tokenizer, CHAT, "x").mask) > 0  # no tags: prefix differencing still finds the turns


def test_overlong_samples_are_dropped_truncated_or_refused_and_counted(chatml_tokenizer):
    long = {"prompt": "What is " * 40, "completion": "x" * 30}
    short = {"prompt": "Hi", "completion": "Hello"}
    records = [("d:1", short), ("d:2", long)]
    size = len(encode(chatml_tokenizer, to_messages(long, "d:2"), "d:2").ids)
    limit = size - 5
    samples, stats = encode_records(chatml_tokenizer, records, limit, SFTDataConfig(overlong="drop"))
    assert len(samples) == 1 and stats.dropped_overlong == 1 and stats.truncated == 0
    samples, stats = encode_records(chatml_tokenizer, records, limit, SFTDataConfig(overlong="truncate"))
    assert len(samples) == 2 and stats.truncated == 1 and len(samples[1].ids) == limit + 1
    with pytest.raises(DataError, match=r"d:2: \d+ tokens, longer than the context"):
        encode_records(chatml_tokenizer, records, limit, SFTDataConfig(overlong="error"))


def test_pack_fills_rows_without_overflow():
    lengths = [5, 9, 3, 7, 1, 8, 2, 6]
    rows = pack(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 5  # 41 tokens in rows of 10: best-fit decreasing needs one more than the bound


def test_packed_loss_equals_unpacked_loss_and_samples_do_not_see_each_other(chatml_tokenizer):
    records = [(f"r{i}", {"prompt": f"What is {i} + {i * 3}?", "completion": str(i * 4) * (1 + i % 3)})
               for i in range(12)]
    samples, _ = encode_records(chatml_tokenizer, records, 128, SFTDataConfig())
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=chatml_tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                                    num_kv_heads=2, intermediate_size=64, max_seq_len=128)).eval()
    rows = pack([len(s.ids) - 1 for s in samples], 128)
    assert len(rows) < len(samples)  # several samples per row
    packed = collate(samples, rows)
    unpacked = collate(samples, [[i] for i in range(len(samples))])
    with torch.no_grad():
        a, b = sft_loss(model, packed), sft_loss(model, unpacked)
        assert int(a.count) == int(b.count)
        torch.testing.assert_close(a.total, b.total, atol=1e-5, rtol=1e-5)
        # logits of a packed sample equal the sample run alone
        logits = model(packed["input_ids"], attention_mask=packed["attention_mask"],
                       position_ids=packed["position_ids"])
        row, segment = 0, 2
        where = packed["attention_mask"][row] == segment
        alone = model(sample_tensors(samples[rows[row][segment - 1]])[0][None])
        torch.testing.assert_close(logits[row][where], alone[0], atol=1e-5, rtol=1e-5)


def test_batches_are_a_pure_function_of_the_step(chatml_tokenizer):
    records = [(f"r{i}", {"prompt": f"Q{i}", "completion": f"A{i}"}) for i in range(30)]
    samples, _ = encode_records(chatml_tokenizer, records, 64, SFTDataConfig())
    one = SFTBatches(samples, 64, batch_size=2, grad_accum=2, seed=3)
    two = SFTBatches(samples, 64, batch_size=2, grad_accum=2, seed=3)
    for step in (0, 5, 1, 40):  # any order, across epochs
        for x, y in zip(one.micro_batches(step), two.micro_batches(step)):
            assert all(torch.equal(x[k], y[k]) for k in x)
    ranks = [SFTBatches(samples, 64, batch_size=2, grad_accum=1, seed=3, rank=r, world_size=2) for r in range(2)]
    whole = SFTBatches(samples, 64, batch_size=4, grad_accum=1, seed=3)
    joined = torch.cat([ranks[0].micro_batches(7)[0]["targets"].flatten(), ranks[1].micro_batches(7)[0]["targets"].flatten()])
    assert (joined != IGNORE_INDEX).sum() == (whole.micro_batches(7)[0]["targets"] != IGNORE_INDEX).sum()
