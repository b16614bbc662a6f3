"""`lmstack finetune` with method: prompt / p_tuning / prefix / ia3 / bottleneck: only the method's parameters
change, every checkpoint is an adapter directory that loads back (peft loads the peft-format ones) with the
run's logits, generate takes it, resume continues exactly, and merge refuses what cannot be merged."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lmstack
from lmstack.adapters import is_adapter_parameter
from lmstack.cli import main as cli
from lmstack.errors import CheckpointError
from tests.finetune.test_recipe import config, peft, transformers, write_data

SECTIONS = {"prompt": {"prompt_tuning.num_virtual_tokens": 4},
            "p_tuning": {"p_tuning.num_virtual_tokens": 4, "p_tuning.encoder_hidden_size": 16},
            "prefix": {"prefix_tuning.num_virtual_tokens": 4, "prefix_tuning.encoder_hidden_size": 16},
            "ia3": {}, "bottleneck": {"bottleneck.bottleneck_size": 4}}


SLOW = pytest.mark.slow  # P-tuning's and prefix tuning's formats are covered by tests/adapters in the default suite


@pytest.mark.parametrize("method", [m if m not in ("p_tuning", "prefix") else pytest.param(m, marks=SLOW)
                                    for m in SECTIONS])
def test_run_trains_only_the_method_and_its_checkpoint_loads(base_dir, tmp_path, method, capsys):
    from lmstack.train.recipes.finetune import build_engine

    cfg = config(base_dir, write_data(tmp_path / "d.jsonl"), tmp_path / "run", method=method, **SECTIONS[method])
    engine = build_engine(cfg)
    before = {n: p.detach().clone() for n, p in engine.base_model.named_parameters()}
    result = engine.fit()
    after = dict(engine.base_model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(is_adapter_parameter(n) for n in changed), changed
    x = torch.randint(0, 40, (2, 12))  # the base's rows (transformers' resize initialises new rows its own way)
    engine.base_model.eval()
    with torch.no_grad():
        ours = engine.base_model(x)
        reloaded = lmstack.load_model(base_dir, adapter=result.checkpoint).eval()
        torch.testing.assert_close(reloaded(x), ours, atol=1e-5, rtol=1e-5)
        if method != "bottleneck":
            hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
            hf.resize_token_embeddings(ours.shape[-1])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = peft.PeftModel.from_pretrained(hf, result.checkpoint).eval()(x).logits
            P, V = 4 if method in ("prompt", "p_tuning") else 0, lmstack.load_model(base_dir).config.vocab_size
            torch.testing.assert_close(theirs[:, P:, :V], ours[..., :V], atol=1e-5, rtol=1e-5)  # the base's columns
    assert cli(["generate", "--model", str(base_dir), "--adapter", str(result.checkpoint), "--chat",
                "--prompt", "What is 2 + 2?", "--max-new-tokens", "4", "--jsonl"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["finish_reason"] in ("length", "stop")
    if method != "ia3":
        assert cli(["merge", "--model", str(base_dir), "--adapter", str(result.checkpoint), "--out",
                    str(tmp_path / "m")]) != 0
        assert "cannot be folded into the weights" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["p_tuning", pytest.param("bottleneck", marks=SLOW)])
def test_resume_continues_exactly(base_dir, tmp_path, method):
    """P-tuning's encoder is not in the peft file: the checkpoint keeps it beside (lmstack_adapter_state)."""
    from lmstack.train.recipes.finetune import build_engine

    data = write_data(tmp_path / "d.jsonl")
    constant = {"train.steps": 4, "schedule.kind": "constant", "method": method, **SECTIONS[method]}
    straight = build_engine(config(base_dir, data, tmp_path / "a", **constant)).fit()
    first = config(base_dir, data, tmp_path / "b", **constant, **{"train.checkpoint_every": 2})
    engine = build_engine(copy.deepcopy(first))
    engine.cfg.steps = 2
    engine.fit()
    resumed = build_engine(first, resume=True).fit()
    x = load_file(straight.checkpoint / "lmstack_adapter_state.safetensors")
    y = load_file(resumed.checkpoint / "lmstack_adapter_state.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    # resuming that run as another method is refused
    other = config(base_dir, data, tmp_path / "b", **{**constant, "method": "ia3"})
    with pytest.raises(CheckpointError, match=f"holds a {'P_TUNING' if method == 'p_tuning' else 'LMSTACK_BOTTLENECK'} "
                                              "adapter, but this run trains IA3"):
        build_engine(other, resume=True).fit()


def test_rows_and_virtual_tokens_must_fit_the_context(base_dir, tmp_path):
    from lmstack.errors import ConfigError
    from lmstack.train.recipes.finetune import build_engine

    cfg = config(base_dir, write_data(tmp_path / "d.jsonl"), tmp_path / "run", method="prompt",
                 **{"prompt_tuning.num_virtual_tokens": 40})  # rows of 96 tokens, a 128-token context
    with pytest.raises(ConfigError, match=r"train.seq_len \(96\) \+ the method's 40 virtual tokens exceed .* <= 88"):
        build_engine(cfg)
