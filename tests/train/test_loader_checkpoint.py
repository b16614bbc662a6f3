"""The pretraining loader (determinism, rank slicing, shard boundaries, bad input), checkpoint
flattening and pruning, and the recipes under configs/."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmstack.data.loader import DataError, PretrainBatches, TokenStream, validation_batches
from lmstack.errors import ConfigError
from lmstack.schema import load_config
from lmstack.train import checkpoint as ckpt
from lmstack.train.config import PretrainConfig
from lmstack.train.recipes.pretrain import build_model_config

from .conftest import write_split

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def stream(tmp_path: Path) -> tuple[TokenStream, np.ndarray]:
    tokens = np.arange(1000) % 997  # distinct neighbours, so every window identifies its start
    write_split(tmp_path / "train", tokens, 1000, 999, shard_tokens=128)
    return TokenStream(tmp_path / "train"), tokens


def test_reads_cross_shard_boundaries(stream):
    s, tokens = stream
    assert len(s.shards) == 8 and len(s) == 1000
    for start, length in [(0, 5), (120, 20), (127, 1), (128, 300), (990, 10)]:
        np.testing.assert_array_equal(s.read(start, length), tokens[start:start + length])


def test_batches_are_a_function_of_seed_and_step_and_split_by_rank(stream):
    s, tokens = stream
    one = PretrainBatches(s, seq_len=8, batch_size=4, seed=3)
    again = PretrainBatches(s, seq_len=8, batch_size=4, seed=3)
    (x, y), = one.micro_batches(5)
    (x2, y2), = again.micro_batches(5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, one.micro_batches(6)[0][0])
    assert x.dtype == torch.int64 and x.shape == (4, 8)
    for row, target in zip(x, y):  # targets are inputs shifted by one, read from the stream
        start = int(row[0])
        np.testing.assert_array_equal(row.numpy(), tokens[start:start + 8])
        np.testing.assert_array_equal(target.numpy(), tokens[start + 1:start + 9])
    # 2 ranks x batch 2 x accumulation 2 == 1 rank x batch 8, in rank-major, micro-batch order
    whole = PretrainBatches(s, seq_len=8, batch_size=8, seed=3).micro_batches(5)[0][0]
    parts = [mb[0] for rank in range(2)
             for mb in PretrainBatches(s, 8, 2, grad_accum=2, seed=3, rank=rank, world_size=2).micro_batches(5)]
    assert torch.equal(torch.cat(parts), whole)


def test_validation_is_fixed_non_overlapping_and_sharded(stream):
    s, _ = stream
    full = validation_batches(s, seq_len=10, batch_size=8, max_windows=1000)
    starts = torch.cat([x[:, 0] for x, _ in full])
    assert starts.tolist() == list(range(0, 960, 10))  # 99 windows -> 12 full batches of 8
    thinned = validation_batches(s, seq_len=10, batch_size=4, max_windows=20)
    assert sum(len(x) for x, _ in thinned) == 20
    ranks = [validation_batches(s, 10, 4, 1000, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    merged = torch.cat([torch.cat([a[0], b[0]]) for a, b in zip(*ranks)])[:, 0]
    assert merged.tolist() == list(range(0, 960, 10))


def test_bad_shards_are_named(tmp_path: Path):
    write_split(tmp_path / "train", np.arange(100), 128, 0, shard_tokens=64)
    (tmp_path / "train" / "shard-00001.bin").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match=r"shard-00001.bin: 10 bytes, but .*index.json shards\[1\] says 36"):
        TokenStream(tmp_path / "train")
    with pytest.raises(DataError, match="index.json: not found"):
        TokenStream(tmp_path / "nope")
    index = tmp_path / "train" / "index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "format": "other"}))
    with pytest.raises(DataError, match="format is 'other'"):
        TokenStream(tmp_path / "train")


def test_optimizer_state_round_trips_through_tensors_and_json():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), betas=(0.8, 0.9))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = {"state": {f"p{k}": v for k, v in opt.state_dict()["state"].items()},
             "param_groups": [{**g, "params": [f"p{i}" for i in g["params"]]} for g in opt.state_dict()["param_groups"]]}
    tensors, skeleton = ckpt.flatten_optimizer_state(state)
    assert set(tensors) == {"p0/step", "p0/exp_avg", "p0/exp_avg_sq", "p1/step", "p1/exp_avg", "p1/exp_avg_sq"}
    back = ckpt.unflatten_optimizer_state(tensors, json.loads(json.dumps(skeleton)))
    assert back["param_groups"] == state["param_groups"]
    for name, entry in state["state"].items():
        assert all(torch.equal(entry[k], back["state"][name][k]) for k in entry)


def test_prune_keeps_last_k_and_best(tmp_path: Path):
    for step in (1, 2, 3, 4):
        path = ckpt.step_dir(tmp_path, step)
        path.mkdir()
        (path / ckpt.TRAINER_STATE).write_text("{}")
    (tmp_path / ".step-00000005.tmp-x").mkdir()  # a save killed mid-write
    (tmp_path / "step-00000006").mkdir()  # incomplete: no trainer_state.json, never listed
    ckpt.record_best(tmp_path, ckpt.step_dir(tmp_path, 2), 1.5, 2)
    ckpt.prune_checkpoints(tmp_path, keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000004"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000004"
    assert not (tmp_path / ".step-00000005.tmp-x").exists()
    with pytest.raises(ValueError, match="trainer_state.json: not found"):
        ckpt.load_checkpoint(tmp_path / "step-00000006")


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")
                                        if not p.name.startswith(("finetune-", "align-", "distill-", "classify-"))))
def test_recipes_load(name: str):  # pretraining configs; finetune-*, align-*, distill-*.yaml: their own tests
    cfg = load_config(PretrainConfig, CONFIGS / name)
    if cfg.objective == "clm":
        model = build_model_config(cfg.model, vocab_size=66, eos_token_id=65)
    else:  # an encoder / encoder-decoder: the model section holds EncoderConfig / Seq2SeqConfig fields
        from lmstack.model.configs import ENCODER_PRESETS, SEQ2SEQ_PRESETS, EncoderConfig, Seq2SeqConfig
        from lmstack.train.recipes.denoising import _config
        cls, presets = (Seq2SeqConfig, SEQ2SEQ_PRESETS) if cfg.objective == "span" else (EncoderConfig, ENCODER_PRESETS)
        model = _config(cfg.model, cls, presets, {"vocab_size": 66})
    assert cfg.train.seq_len <= model.max_seq_len and cfg.data.path


def test_config_errors_name_the_key(tmp_path: Path):
    with pytest.raises(ConfigError, match="unknown key train.stepz"):
        load_config(PretrainConfig, None, ["--train.stepz=3"])
    with pytest.raises(ConfigError, match=r"--train.precision=fp8 \(command line\): expected one of"):
        load_config(PretrainConfig, None, ["--train.precision=fp8"])
    with pytest.raises(ConfigError, match="unknown key model.hiden_size"):
        build_model_config({"hiden_size": 3}, 66, 65)
    with pytest.raises(ConfigError, match=r"model.vocab_size \(10\) is smaller than the data's vocab_size \(66\)"):
        build_model_config({"preset": "llama-tiny", "vocab_size": 10, "eos_token_id": 2}, 66, 65)
    with pytest.raises(ConfigError, match="model.preset: unknown preset 'nope'"):
        build_model_config({"preset": "nope"}, 66, 65)


def test_a_preset_on_this_data_keeps_no_special_ids_of_the_presets_tokenizer():
    """llama-1b's bos 128000 belongs to Llama 3's tokenizer: on a 4096-token dataset it is dropped (eos is
    the data's), unless the model section sets it, which is then an error naming the field."""
    config = build_model_config({"preset": "llama-1b", "num_layers": 1}, vocab_size=4096, eos_token_id=2)
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id) == (4096, None, 2, None)
    with pytest.raises(ConfigError, match=r"model: bos_token_id 128000 is outside the vocabulary \[0, 4096\)"):
        build_model_config({"preset": "llama-1b", "bos_token_id": 128000}, vocab_size=4096, eos_token_id=2)
