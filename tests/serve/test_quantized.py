"""A quantized model directory (`lmstack quantize`'s output) served as it loads: greedy output through the
server equals `lmstack.generate` on the same quantized model."""

from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx")

import lmstack


def test_serves_an_int8_model(start_server, tiny_model_dir, tmp_path):
    from lmstack.quant.apply import QuantConfig, quantize_model
    from lmstack.quant.checkpoint import save_quantized
    from lmstack.tokenizer import Tokenizer

    model = lmstack.load_model(tiny_model_dir).eval()
    quantize_model(model, QuantConfig(method="rtn", bits=8, group_size=None, symmetric=True))
    directory = save_quantized(model, tmp_path / "int8", source_dir=tiny_model_dir)
    quantized, tok = lmstack.load_model(directory).eval(), Tokenizer.load(directory)
    expected = lmstack.generate(quantized, tok, "The list of statements", max_new_tokens=10).texts[0]
    live = start_server(model=str(directory))
    out = httpx.post(live.url + "/v1/completions", json={"prompt": "The list of statements", "max_tokens": 10,
                                                         "temperature": 0}, timeout=60).json()
    assert out["choices"][0]["text"] == expected
