"""`prepare` end to end: shards hold exactly what `tokenizers` encodes, the report counts what was planted,
the splits are right, and bad input fails with one message and no output."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from lmstack.cli import main as lmstack_main
from lmstack.data.clean import normalize
from lmstack.data.pipeline import PrepareConfig, prepare, work_dir_for
from lmstack.errors import DataError
from lmstack.schema import from_dict

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river garden window letter morning evening question "
         "answer story mountain village harbour winter summer captain doctor family friend silence").split()


def make_doc(rng: random.Random, sentences: int = 8) -> str:
    out = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 12))]
        out.append(" ".join(words).capitalize() + ".")
    return "\n".join(" ".join(out[i:i + 2]) for i in range(0, len(out), 2))


def read_split(directory: Path) -> tuple[dict, list[np.ndarray]]:
    """index.json and each document's ids (with its eos) of one split, read as a trainer would."""
    index = json.loads((directory / "index.json").read_text())
    docs = []
    for shard in index["shards"]:
        tokens = np.memmap(directory / shard["file"], dtype=index["dtype"], mode="r")
        offsets = np.fromfile(directory / shard["doc_offsets"], dtype="<u8")
        assert len(tokens) == shard["num_tokens"] and len(offsets) == shard["num_documents"]
        bounds = [*offsets.tolist(), len(tokens)]
        docs += [np.array(tokens[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return index, docs


def config(**kw) -> PrepareConfig:
    return from_dict(PrepareConfig, {"workers": 2, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """docs.jsonl.gz + notes.txt with planted problems; returns (dir, the documents that must survive)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    good = [make_doc(rng) for _ in range(40)]
    near = good[3].split()
    near[10] = "harbour" if near[10] != "harbour" else "winter"  # one word changed: Jaccard ~0.9
    lines = [json.dumps({"text": t}) for t in good[:30]]
    lines += ["{broken json", json.dumps({"body": "no text field"}),
              json.dumps({"text": good[5].upper()}),  # exact duplicate after case folding
              json.dumps({"text": "  " + good[6].replace(" ", "   ") + "\n"}),  # exact duplicate modulo spacing
              json.dumps({"text": " ".join(near)}),  # near duplicate
              json.dumps({"text": "Too short."}),  # min_words
              json.dumps({"text": "caf\u0065\u0301 " + good[30]})]  # NFC: kept, normalised
    with gzip.open(root / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    good[31] = good[31].replace(" ", " \udcff", 1)  # stands for one invalid byte, written below as 0xFF
    (root / "notes.txt").write_bytes("\n\n".join(good[31:]).encode("utf-8", errors="surrogateescape"))
    survivors = [normalize(t) for t in good[:30]] + [normalize("caf\u0065\u0301 " + good[30])]
    survivors += [normalize(t.replace("\udcff", "\ufffd")) for t in good[31:]]
    return root, survivors


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    root, _ = corpus
    out = tmp_path_factory.mktemp("prep") / "out"
    prepare(config(inputs=[str(root / "docs.jsonl.gz"), str(root / "notes.txt")], text_unit="paragraph",
                   train_tokenizer="bpe:400", output=str(out), val_fraction=0.2, shard_chars=3000))
    return out


def test_shards_hold_the_reference_encoding_of_each_surviving_document(corpus, prepared: Path) -> None:
    _, survivors = corpus
    ref = tokenizers.Tokenizer.from_file(str(prepared / "tokenizer" / "tokenizer.json"))
    train_index, train_docs = read_split(prepared / "train")
    val_index, val_docs = read_split(prepared / "val")
    eos = train_index["eos_token_id"]
    assert eos == ref.token_to_id("<|endoftext|>") or eos == val_index["eos_token_id"]
    expected = [np.array(e.ids + [eos]) for e in ref.encode_batch(survivors, add_special_tokens=False)]
    # every 5th kept document (val_fraction 0.2) is in val, in order; the rest in train, in order
    want_val = [e for k, e in enumerate(expected) if int((k + 1) * 0.2) > int(k * 0.2)]
    want_train = [e for k, e in enumerate(expected) if int((k + 1) * 0.2) == int(k * 0.2)]
    assert len(val_docs) == len(want_val) == 8 and len(train_docs) == len(want_train) == 32
    for got, want in zip(train_docs + val_docs, want_train + want_val):
        np.testing.assert_array_equal(got, want)
    assert len(train_index["shards"]) > 3  # shard_chars=3000 forces several shards
    for index in (train_index, val_index):
        assert index["format"] == "lmstack-tokens-v1" and index["dtype"] == "uint16"
        assert index["vocab_size"] == ref.get_vocab_size(with_added_tokens=True) == 400
        assert index["num_tokens"] == sum(s["num_tokens"] for s in index["shards"])
        assert len(index["tokenizer_sha256"]) == 64
    assert not work_dir_for(prepared).exists()


def test_report_counts_the_planted_problems(prepared: Path) -> None:
    report = json.loads((prepared / "data_report.json").read_text())
    assert report["ingest"]["malformed_lines"] == 1 and report["ingest"]["missing_field"] == 1
    assert report["ingest"]["invalid_utf8_bytes"] == 1
    assert report["documents_in"] == 35 + 9  # 35 readable JSONL records + 9 paragraphs
    assert report["filters"]["dropped"]["min_words"] == 1 and report["filters"]["dropped_total"] == 1
    assert report["dedup"]["exact_removed"] == 2 and report["dedup"]["near_removed"] == 1
    assert report["documents_out"] == 40
    assert report["tokens_out"] == report["split"]["train"]["tokens"] + report["split"]["val"]["tokens"]
    text_tokens = report["tokens_out"] - report["documents_out"]
    assert report["chars_per_token"] == pytest.approx(report["characters_out"] / text_tokens)
    md = (prepared / "data_report.md").read_text()
    assert "| exact duplicates removed | 2 |" in md and "| min_words | 1 |" in md


def test_reusing_a_tokenizer_and_no_clean_no_dedup(corpus, prepared: Path, tmp_path: Path) -> None:
    root, _ = corpus
    out = tmp_path / "again"
    report = prepare(config(inputs=[str(root / "docs.jsonl.gz")], tokenizer=str(prepared / "tokenizer"),
                            output=str(out), clean=False, dedup={"exact": False, "near": False}, workers=0))
    assert report["documents_out"] == 35 and report["filters"]["dropped_total"] == 0
    old = json.loads((prepared / "train" / "index.json").read_text())
    new = json.loads((out / "train" / "index.json").read_text())
    assert new["tokenizer_sha256"] == old["tokenizer_sha256"]


def test_tail_split_is_the_end_of_the_token_stream(tmp_path: Path) -> None:
    rng = random.Random(2)
    docs = [make_doc(rng, 4) for _ in range(12)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs), encoding="utf-8")
    out = tmp_path / "out"
    prepare(config(inputs=[str(tmp_path / "a.txt")], text_unit="paragraph", train_tokenizer="char",
                   output=str(out), split="tail", val_fraction=0.25, shard_chars=700, clean=False,
                   dedup={"exact": False, "near": False}))
    ref = tokenizers.Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    train_index, _ = read_split(out / "train")
    eos = train_index["eos_token_id"]
    stream = np.concatenate([np.array(ref.encode(d, add_special_tokens=False).ids + [eos]) for d in docs])
    train = np.concatenate([np.fromfile(out / "train" / s["file"], dtype="<u2") for s in train_index["shards"]])
    val_index = json.loads((out / "val" / "index.json").read_text())
    val = np.concatenate([np.fromfile(out / "val" / s["file"], dtype="<u2") for s in val_index["shards"]])
    assert len(val) == round(len(stream) * 0.25)
    np.testing.assert_array_equal(np.concatenate([train, val]), stream)
    # the document cut by the split continues at offset 0 of val's first shard
    first_val_offsets = np.fromfile(out / "val" / val_index["shards"][0]["doc_offsets"], dtype="<u8")
    assert first_val_offsets[0] == 0


def test_bad_inputs_fail_with_one_message_and_leave_nothing(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="empty input"):
        prepare(config(inputs=[str(empty)], train_tokenizer="bpe:300", output=str(out)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{bad}:2: malformed JSON"):
        prepare(config(inputs=[str(bad)], train_tokenizer="bpe:300", output=str(out), strict=True))
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "only a few words"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"no documents left.*min_words"):
        prepare(config(inputs=[str(short)], train_tokenizer="bpe:300", output=str(out)))
    assert not out.exists() and not work_dir_for(out).exists()
    # unwritable output (its parent is a file), existing output, options: one line through the CLI
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for argv, message in [
        (["--input", str(short), "--train-tokenizer", "bpe:300", "-o", str(blocker / "out")], "cannot create"),
        (["--input", str(short), "--train-tokenizer", "bpe:300", "-o", str(blocker)], "already exists"),
        (["--input", str(tmp_path / "nope.txt"), "--train-tokenizer", "bpe:300", "-o", str(out)], "no such file"),
        (["--input", str(short), "-o", str(out)], "--tokenizer DIR or --train-tokenizer"),
        (["--input", str(short), "--train-tokenizer", "bpe:300", "-o", str(out), "--quality.min_wordz=3"],
         "unknown key quality.min_wordz"),
    ]:
        assert lmstack_main(["data", "prepare", *argv]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_a_second_prepare_into_the_same_output_is_refused(tmp_path: Path) -> None:
    import fcntl

    (tmp_path / "a.txt").write_text(make_doc(random.Random(3)), encoding="utf-8")
    out = tmp_path / "out"
    with open(tmp_path / ".out.lmstack-lock", "w") as held:  # what a running prepare holds
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(DataError, match="another `lmstack data prepare` is writing it"):
            prepare(config(inputs=[str(tmp_path / "a.txt")], train_tokenizer="char", output=str(out)))
    prepare(config(inputs=[str(tmp_path / "a.txt")], train_tokenizer="char", output=str(out), workers=0))
    assert (out / "train" / "index.json").exists() and not (tmp_path / ".out.lmstack-lock").exists()



def test_ids_beyond_uint16_are_written_as_uint32(tmp_path: Path) -> None:
    """pack's dtype choice and eos placement, driven directly (a real 66k vocabulary is slow to build)."""
    from lmstack.data import pack
    from lmstack.tokenizer import train_tokenizer

    texts = [make_doc(random.Random(4), 2), make_doc(random.Random(5), 2)]
    train_tokenizer(iter(texts), "char", None).save(tmp_path / "tok")
    spool = pack.SpoolWriter(tmp_path / "spool", 10**6)
    for t in texts:
        spool.add(t)
    spool.flush()
    (tmp_path / "shards").mkdir()
    eos = 70_000  # an id only uint32 can hold
    meta = pack.tokenize_chunk(pack.ShardJob(str(tmp_path / "spool"), str(tmp_path / "shards"), 0,
                                             str(tmp_path / "tok"), eos, vocab_size=70_001))
    ref = tokenizers.Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    want = [i for t in texts for i in ref.encode(t, add_special_tokens=False).ids + [eos]]
    np.testing.assert_array_equal(np.fromfile(tmp_path / "shards" / meta["file"], dtype="<u4"), want)
    assert pack.token_dtype(65_536) == np.dtype("<u2") and pack.token_dtype(65_537) == np.dtype("<u4")
    header = pack.IndexHeader(70_001, eos, "x")
    assert header.index([meta])["dtype"] == "uint32"
