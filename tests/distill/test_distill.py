"""Distillation: the KL terms against torch's kl_div, the Hinton mix (T^2, alpha) by hand, the top-k cache (k = V is
the full KL; computed once and reused), `lmstack distill` end to end with a cached and a live teacher, the reverse
option, and the vocabulary-mismatch error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import lmstack
from lmstack.cli import main as cli
from lmstack.errors import ConfigError
from lmstack.train.objectives.distill import TopK, distill_objective, forward_kl, reverse_kl
from tests.train.conftest import write_split


def test_kl_terms_match_torch_kl_div():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    T = 2.5
    expected = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(forward_kl(s, t, T), expected)
    rev = F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(reverse_kl(s, t), rev)
    top = t.topk(11, dim=-1)  # k = V: the cache's KL is the full one
    torch.testing.assert_close(forward_kl(s, top.values, T, top.indices), expected)


def tiny(vocab: int = 40, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return lmstack.Transformer(lmstack.preset("llama-tiny", vocab_size=vocab, num_layers=1, hidden_size=32,
                                              intermediate_size=48, bos_token_id=None, eos_token_id=None,
                                              pad_token_id=None, **kw))


def test_objective_is_hintons_mix_summed_over_tokens():
    student, teacher = tiny(), tiny(seed=1)
    x, y = torch.randint(0, 40, (2, 6)), torch.randint(0, 40, (2, 6))
    T, alpha = 3.0, 0.3
    loss = distill_objective(teacher, T, alpha)(student.train(), {"input_ids": x, "targets": y})
    with torch.no_grad():
        s, t = student(x), teacher(x)
        ce = F.cross_entropy(s.flatten(0, 1), y.flatten(), reduction="sum")
        kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="sum")
    torch.testing.assert_close(loss.total.detach(), (1 - alpha) * ce + alpha * T**2 * kl, rtol=1e-5, atol=1e-5)
    assert int(loss.count) == 12
    cache = TopK(t.topk(40, -1).values, t.topk(40, -1).indices)  # windows 0 and 1 of a cache: the same numbers
    cached = distill_objective(None, T, alpha, cache=cache)(student, {"input_ids": x, "targets": y,
                                                                      "window": torch.tensor([0, 1])})
    torch.testing.assert_close(cached.total.detach(), loss.total.detach(), rtol=1e-5, atol=1e-5)
    student.eval()  # evaluation scores the student's own cross-entropy
    torch.testing.assert_close(distill_objective(teacher, T, alpha)(student, {"input_ids": x, "targets": y}).total,
                               ce, rtol=1e-5, atol=1e-5)


@pytest.fixture()
def setup(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 40, 6000)
    write_split(tmp_path / "data" / "train", tokens[:5000], 40, 39, 4000)
    write_split(tmp_path / "data" / "val", tokens[5000:], 40, 39, 4000)
    lmstack.save_model(tiny(), tmp_path / "teacher")
    return tmp_path


def args(tmp, out, *extra):
    return ["distill", f"--teacher={tmp / 'teacher'}", f"--data.path={tmp / 'data'}", f"--out_dir={tmp / out}",
            "--student.preset=llama-tiny", "--student.num_layers=1", "--student.hidden_size=16",
            "--student.intermediate_size=32", "--student.num_heads=2", "--student.num_kv_heads=1",
            "--train.steps=3", "--train.batch_size=4", "--train.seq_len=32", "--train.progress=false",
            "--train.eval_every=0", "--train.eval_windows=4", "--train.peak_flops=1e12", *extra]


def test_distill_cli_with_a_cached_and_a_live_teacher(setup, capsys):
    assert cli(args(setup, "cached", "--distill.top_k=8")) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert out["steps"] == 3 and out["val_loss"] is not None
    cache = setup / "cached" / "teacher_topk.safetensors"
    with safe_open(cache, framework="pt") as f:
        assert f.get_tensor("values").shape == ((5000 - 1) // 32, 32, 8)
    student = lmstack.load_model(out["checkpoint"])
    assert student.config.hidden_size == 16 and student.config.vocab_size == 40
    assert cli(args(setup, "live", "--distill.kind=reverse", "--distill.prompt_len=4", "--distill.sample_len=4")) == 0
    metrics = (setup / "live" / "metrics.jsonl").read_text()
    assert '"kl"' in metrics


def test_a_teacher_of_another_vocabulary_is_refused(setup, capsys):
    lmstack.save_model(tiny(vocab=48), setup / "teacher")
    assert cli(args(setup, "bad")) != 0
    assert "teacher's vocabulary has 48 tokens and the student's 40" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="needs the live teacher"):
        distill_objective(None, kind="reverse")


def test_shipped_distill_configs_load():
    from pathlib import Path

    from lmstack.schema import load_config
    from lmstack.train.recipes.distill import DistillConfig

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("distill-*.yaml"))
    assert configs
    for path in configs:
        cfg = load_config(DistillConfig, path)
        assert cfg.teacher and cfg.data.path and cfg.student
