"""Resume: a real `lmstack data prepare` process killed after its first shard leaves only finished
shards; rerunning keeps them (same inodes) and produces exactly the reference token stream."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tokenizers

from lmstack.data.pipeline import PrepareConfig, prepare, work_dir_for
from lmstack.schema import from_dict
from lmstack.tokenizer import train_tokenizer
from .test_data_prepare import make_doc, read_split

REPO = Path(__file__).resolve().parents[2]


def test_killed_run_resumes_from_its_finished_shards(tmp_path: Path, capfd) -> None:
    rng = random.Random(5)
    docs = [make_doc(rng, 6) for _ in range(4000)]  # many shards: a loaded machine cannot finish them all before the kill
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(docs), encoding="utf-8")
    tok_dir = tmp_path / "tok"
    train_tokenizer(iter(docs[:200]), "bpe", 400).save(tok_dir)
    out = tmp_path / "out"
    args = ["--input", str(corpus), "--text-unit", "paragraph", "--tokenizer", str(tok_dir), "-o", str(out),
            "--val-fraction", "0", "--shard-size-mb", "0.01", "--no-clean", "--no-dedup", "--workers", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "lmstack", "data", "prepare", *args], cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shard_dir = work_dir_for(out) / "shards" / "train"
    deadline = time.monotonic() + 120
    while not (shard_dir / "shard-00000.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()

    assert not out.exists()  # nothing published
    finished = sorted(shard_dir.glob("shard-*.json"))
    all_bins = [p for p in shard_dir.glob("shard-*.bin") if not p.name.endswith(".docs.bin")]
    num_chunks = len(list((work_dir_for(out) / "spool" / "train").glob("chunk-*.idx")))
    assert 1 <= len(finished) < num_chunks, (len(finished), num_chunks)
    # a shard is written bin, docs.bin, then json: only the one worker's shard in flight at the kill may
    # have its .bin under a final name without its .json; resuming must throw that one away and redo it
    finished_stems = {p.name[:-5] for p in finished}
    bin_stems = {p.name[:-4] for p in all_bins}
    assert finished_stems <= bin_stems and len(bin_stems - finished_stems) <= 1, (bin_stems, finished_stems)
    inodes = {p.name[:-5]: (shard_dir / (p.name[:-5] + ".bin")).stat().st_ino for p in finished}

    cfg = from_dict(PrepareConfig, {"inputs": [str(corpus)], "text_unit": "paragraph", "tokenizer": str(tok_dir),
                                    "output": str(out), "val_fraction": 0.0, "shard_chars": 10_000,
                                    "clean": False, "dedup": {"exact": False, "near": False}, "workers": 2})
    prepare(cfg)
    assert f"resuming: {len(finished)} finished shards kept" in capfd.readouterr().err
    assert not work_dir_for(out).exists()
    for stem, inode in inodes.items():  # published by hard link: the very files written before the kill
        assert (out / "train" / f"{stem}.bin").stat().st_ino == inode
    index, got = read_split(out / "train")
    assert len(index["shards"]) == num_chunks
    ref = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    want = [e.ids + [index["eos_token_id"]] for e in ref.encode_batch(docs, add_special_tokens=False)]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    val_index, val_docs = read_split(out / "val")
    assert val_index["num_tokens"] == 0 and val_docs == []


def test_remove_unfinished_drops_a_shard_killed_before_its_json(tmp_path: Path) -> None:
    from lmstack.data.pack import remove_unfinished
    for stem in ("shard-00000", "shard-00001"):
        (tmp_path / f"{stem}.bin").write_bytes(b"\0" * 8)
        (tmp_path / f"{stem}.docs.bin").write_bytes(b"\0" * 8)
    (tmp_path / "shard-00000.json").write_text("{}", encoding="utf-8")
    (tmp_path / "shard-00002.bin").write_bytes(b"\0" * 4)  # killed before its docs.bin
    (tmp_path / ".shard-00002.docs.bin.tmp-123").write_bytes(b"\0")
    assert remove_unfinished(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.bin", "shard-00000.docs.bin", "shard-00000.json"]
