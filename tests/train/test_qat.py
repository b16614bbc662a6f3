"""`qat:` in a pretrain config: the engine trains fake-quantized linears, OUT/quantized/ holds the converted
int model, which computes what the fake-quantized model computed and equals RTN of the last checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmstack
from lmstack.errors import ConfigError
from lmstack.quant.linear import IntLinear
from lmstack.quant.qat import FakeQuantLinear, prepare_qat
from lmstack.schema import load_config
from lmstack.train.config import PretrainConfig
from lmstack.train.metrics import read_metrics
from lmstack.train.recipes.pretrain import run


def _config(data: Path, out: Path, *extra: str) -> PretrainConfig:
    args = [f"--data.path={data}", f"--out_dir={out}", "--model.preset=llama-tiny", "--model.max_seq_len=32",
            "--train.steps=3", "--train.batch_size=4", "--train.seq_len=16", "--train.progress=false",
            "--train.eval_every=0", "--train.peak_flops=1e9", "--optim.lr=3e-3", "--schedule.warmup_steps=0", *extra]
    return load_config(PretrainConfig, None, args)


def test_pretrain_with_qat_writes_the_converted_model(tiny_data: Path, tmp_path: Path):
    cfg = _config(tiny_data, tmp_path / "qat", "--qat.bits=4", "--qat.group_size=16")
    result = run(cfg)
    quantized = lmstack.load_model(tmp_path / "qat" / "quantized").eval()
    ints = {n: m for n, m in quantized.named_modules() if isinstance(m, IntLinear)}
    assert len(ints) == 7 * quantized.config.num_layers and all(m.bits == 4 for m in ints.values())
    assert quantized.quantization_config["method"] == "qat"

    # the checkpoint holds the fp32 latent weights; fake-quantizing them gives exactly the converted model
    latent = lmstack.load_model(result.checkpoint).eval()
    prepare_qat(latent, 4, 16)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.allclose(quantized(ids), latent(ids), atol=1e-5)

    # the documented alternative: RTN of any checkpoint with the section's settings is the same int model
    from lmstack.cli import main as cli
    assert cli(["quantize", "--model", str(result.checkpoint), "--method", "rtn", "--bits", "4", "--group-size", "16",
                "--out", str(tmp_path / "rtn")]) == 0
    rtn = lmstack.load_model(tmp_path / "rtn")
    for name, module in ints.items():
        other = rtn.get_submodule(name)
        assert torch.equal(module.qweight, other.qweight) and torch.equal(module.scales, other.scales)

    # training saw the fake-quantized weights: the first loss differs from the same run without qat
    plain = run(_config(tiny_data, tmp_path / "plain"))
    first = [next(r["loss"] for r in read_metrics(d / "metrics.jsonl") if r.get("kind") == "train")
             for d in (tmp_path / "qat", tmp_path / "plain")]
    assert plain.steps == result.steps and first[0] != first[1]


def test_qat_layers_choose_by_suffix_and_unknown_names_are_refused(tiny_data: Path, tmp_path: Path):
    from lmstack.train.config import QATConfig
    from lmstack.train.qat import apply_qat

    model = lmstack.Transformer(lmstack.preset("llama-tiny", vocab_size=64, max_seq_len=32))
    names = apply_qat(model, QATConfig(bits=8, group_size=None, layers=["down_proj", "self_attn.q_proj"]))
    assert names and all(n.endswith(("mlp.down_proj", "self_attn.q_proj")) for n in names)
    assert sum(isinstance(m, FakeQuantLinear) for m in model.modules()) == len(names) == 2 * model.config.num_layers
    with pytest.raises(ConfigError, match="qat.layers: o_projj match no block linear"):
        apply_qat(model, QATConfig(layers=["o_projj"]))
    with pytest.raises(ConfigError, match="qat.bits: 5"):
        apply_qat(model, QATConfig(bits=5))
