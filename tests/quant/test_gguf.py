"""GGUF export: Q8_0 / Q4_0 bytes equal the gguf package's quantizer; transformers reads the file back and
its logits match lmstack's within the quantization error; unsupported models are refused clearly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lmstack
from lmstack.errors import ConfigError
from lmstack.quant.gguf import export_gguf, quantize_q4_0, quantize_q8_0

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_block_bytes_equal_the_gguf_package(kind):
    w = torch.randn(64, 256) * 0.02
    w[0, :32] = 0.0  # an all-zero block (d = 0)
    w[1, 5] = 0.5  # a block whose largest value is positive (Q4_0's signed d)
    w[2, 7] = -0.5
    ours = (quantize_q8_0 if kind == "Q8_0" else quantize_q4_0)(w)
    theirs = gguf.quants.quantize(w.numpy(), getattr(gguf.GGMLQuantizationType, kind))
    assert ours.shape == theirs.shape == (64, 256 // 32 * (34 if kind == "Q8_0" else 18))
    assert (ours.numpy() == theirs).all()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    import pydoc_data.topics

    from lmstack.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(iter(list(pydoc_data.topics.topics.values())[:30]), "bpe", 384)
    torch.manual_seed(0)
    cfg = lmstack.ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, intermediate_size=128, max_seq_len=128, tie_word_embeddings=False,
                              eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = lmstack.Transformer(cfg)
    directory = tmp_path_factory.mktemp("llama") / "model"
    lmstack.save_model(model, directory, extra_files=tokenizer.files())
    return directory


@pytest.mark.parametrize("qtype,tolerance", [pytest.param("f32", 1e-4, marks=pytest.mark.slow), ("q8_0", 0.02),
                                             pytest.param("q4_0", 0.3, marks=pytest.mark.slow)])
def test_transformers_reads_the_file_and_its_logits_match(llama_dir, tmp_path, qtype, tolerance):
    transformers = pytest.importorskip("transformers")
    model = lmstack.load_model(llama_dir).eval()
    path = tmp_path / f"model-{qtype}.gguf"
    export_gguf(model, llama_dir, path, qtype)
    peer = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                             dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    with torch.no_grad():
        ours, theirs = model(ids), peer(ids).logits
    spread = ours.abs().max()
    assert (ours - theirs).abs().max() <= tolerance * spread
    reader = gguf.GGUFReader(str(path))
    fields = {f.name for f in reader.fields.values()}
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"} <= fields


def test_unsupported_models_are_refused(tmp_path, llama_dir):
    gpt2 = lmstack.Transformer(lmstack.preset("gpt2", num_layers=1, hidden_size=64, num_heads=2, vocab_size=300,
                                              bos_token_id=None, eos_token_id=None))
    with pytest.raises(ConfigError, match="GGUF export supports Llama-family models; this one has "
                                          "position_kind=learned"):
        export_gguf(gpt2, llama_dir, tmp_path / "x.gguf", "q8_0")
    model = lmstack.load_model(llama_dir)
    with pytest.raises(ConfigError, match="q4_k_m: K-quants"):
        export_gguf(model, llama_dir, tmp_path / "x.gguf", "q4_k_m")


def test_export_cli(llama_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "lmstack", "export", "gguf", "--model", str(llama_dir),
                             "--type", "q4_0", "--out", str(tmp_path / "m.gguf")], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "q4_0" in result.stdout and (tmp_path / "m.gguf").exists()


@pytest.mark.slow
def test_llama_cpp_runs_the_file_with_lmstacks_tokens_and_greedy_text(llama_dir, tmp_path):
    """llama-cpp-python (pip builds llama.cpp from source; slow) loads the f32 export: same tokens for a
    text, same greedy continuation."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from lmstack.tokenizer import Tokenizer

    model = lmstack.load_model(llama_dir).eval()
    tok = Tokenizer.load(llama_dir)
    path = tmp_path / "model-f32.gguf"
    export_gguf(model, llama_dir, path, "f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False, n_threads=1)
    text = "The quick brown fox, def f(x): return x"
    ids = tok.encode(text)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    ours = lmstack.generate(model, None, [ids], max_new_tokens=16, ignore_eos=True).token_ids[0]
    theirs = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == 16:
            break
    assert theirs == ours
