"""`qat:` in a finetune config (method full): the run writes OUT/quantized/, which loads, generates and computes
what the fake-quantized model of the last checkpoint computes; with an adapter method it is refused."""

from __future__ import annotations

import json

import pytest
import torch

import lmstack
from lmstack.errors import ConfigError
from lmstack.quant.linear import IntLinear
from lmstack.quant.qat import prepare_qat
from lmstack.schema import load_config
from lmstack.tokenizer import Tokenizer
from lmstack.train.recipes.finetune import FinetuneConfig, build_engine, run


def _config(base, data, out, *extra) -> FinetuneConfig:
    args = [f"--model={base}", f"--data.train={data}", f"--out_dir={out}", "--data.chat_template=chatml",
            "--train.steps=2", "--train.batch_size=2", "--train.seq_len=96", "--train.progress=false",
            "--optim.lr=3e-3", "--schedule.warmup_steps=0", "--train.peak_flops=1e12", *extra]
    return load_config(FinetuneConfig, None, args)


def test_full_finetune_with_qat_writes_a_quantized_model(base_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"What is {i} + {i}?", "output": str(2 * i)})
                              for i in range(12)) + "\n")
    cfg = _config(base_dir, data, tmp_path / "run", "--method=full", "--qat.bits=8", "--qat.group_size=16")
    result = run(cfg)
    quantized = lmstack.load_model(tmp_path / "run" / "quantized").eval()
    assert sum(isinstance(m, IntLinear) and m.bits == 8 for m in quantized.modules()) == 7 * quantized.config.num_layers
    latent = lmstack.load_model(result.checkpoint).eval()
    prepare_qat(latent, 8, 16)
    ids = torch.randint(0, latent.config.vocab_size, (1, 10))
    with torch.no_grad():
        assert torch.allclose(quantized(ids), latent(ids), atol=1e-5)
    tokenizer = Tokenizer.load(tmp_path / "run" / "quantized")  # the run's tokenizer, chat markers included
    assert tokenizer.token_to_id("<|im_start|>") is not None
    out = lmstack.generate(quantized, tokenizer, ["What is 1 + 1?"], max_new_tokens=4)
    assert len(out.texts) == 1

    with pytest.raises(ConfigError, match="qat: trains the base weights, so it needs method: full"):
        build_engine(_config(base_dir, data, tmp_path / "lora", "--method=lora", "--qat.bits=4"))
