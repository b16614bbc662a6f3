"""`lmstack data prepare`'s command line: one output flag, honest names and help, where errors come from,
--print-config, and a validation split that cannot silently be empty."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from lmstack.cli import main
from lmstack.cli.data import build_config

from .test_data_prepare import make_doc


def test_out_is_the_output_flag_and_the_old_spellings_still_work(tmp_path, capsys):
    for flag in ("--out", "--output", "-o"):
        cfg, _ = build_config(["--corpus", "builtin:python-docs", "--train-tokenizer", "char", flag, "x"])
        assert cfg.output == "x"
    with pytest.raises(SystemExit):
        build_config(["--help"])
    text = capsys.readouterr().out
    assert "--out OUT" in text and "--output" not in text and "--shard-size-mb" not in text
    assert "--shard-chars N" in text and "{document,tail}" in text and "{auto,text,jsonl,parquet}" in text


def test_shard_chars_counts_characters_and_the_old_flag_keeps_its_meaning():
    base = ["--corpus", "builtin:python-docs", "--train-tokenizer", "char", "--out", "x"]
    assert build_config([*base, "--shard-chars", "5000"])[0].shard_chars == 5000
    assert build_config([*base, "--shard-size-mb", "0.01"])[0].shard_chars == 10_000


def test_errors_name_the_flag_or_the_file_they_came_from(tmp_path, capsys):
    yaml_file = tmp_path / "prep.yaml"
    yaml_file.write_text("val_fraction: lots\n")
    cases = [
        (["--config", str(yaml_file)], f"{yaml_file}: val_fraction: expected a number, got 'lots'"),
        (["--config", str(yaml_file), "--val-fraction", "0.1", "--dedup.thresh=0.9"],
         "--dedup.thresh=0.9 (command line): unknown key dedup.thresh"),
        (["--quality.min_words=many"], "--quality.min_words=many (command line): expected an integer or null"),
    ]
    for argv, words in cases:
        assert main(["data", "prepare", "--corpus", "builtin:python-docs", "--train-tokenizer", "char",
                     "--out", str(tmp_path / "o"), *argv]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--workers", "two"])
    assert "argument --workers: expected an integer >= 0, got 'two'" in capsys.readouterr().err


def test_print_config_shows_the_effective_config(tmp_path, capsys):
    assert main(["data", "prepare", "--corpus", "builtin:python-docs", "--train-tokenizer", "bpe:300",
                 "--out", str(tmp_path / "o"), "--dedup.threshold=0.7", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["output"] == str(tmp_path / "o") and printed["dedup"]["threshold"] == 0.7
    assert printed["quality"]["max_top_ngram_char_fraction"] == {}  # the built-in corpus's defaults applied
    assert not (tmp_path / "o").exists()


def _texts(tmp_path, documents: int):
    rng = random.Random(1)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": make_doc(rng)}) + "\n" for _ in range(documents)))
    return path


def test_an_empty_validation_split_is_an_error_with_the_fix(tmp_path, capsys):
    docs = _texts(tmp_path, 6)  # 5% of 6 documents rounds to none
    out = tmp_path / "o"
    assert main(["data", "prepare", "--input", str(docs), "--train-tokenizer", "char", "--out", str(out),
                 "--workers", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the validation split is empty: 6 documents kept" in err[0], err
    assert "--split tail" in err[0] and "a --val-fraction of at least 0.167" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".o.*"))


def test_no_validation_split_when_asked_warns_and_pretraining_skips_evaluation(tmp_path, capsys):
    docs = _texts(tmp_path, 6)
    out = tmp_path / "o"
    assert main(["data", "prepare", "--input", str(docs), "--train-tokenizer", "char", "--out", str(out),
                 "--workers", "0", "--val-fraction", "0"]) == 0
    assert "no validation split (--val-fraction 0)" in capsys.readouterr().err
    from lmstack.schema import from_dict
    from lmstack.train.config import PretrainConfig
    from lmstack.train.recipes.pretrain import build_parts

    cfg = from_dict(PretrainConfig, {"data": {"path": str(out)}, "model": {"preset": "llama-tiny"},
                                     "train": {"seq_len": 16, "batch_size": 2}})
    _, batches, val = build_parts(cfg)
    assert val is None and len(batches.micro_batches(0)) == 1
