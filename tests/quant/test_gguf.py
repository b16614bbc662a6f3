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
from lmstack.quant.kquants import q4_k_m_type, quantize_q4_k, quantize_q6_k

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


def test_k_quant_blocks_dequantize_within_the_formats_error():
    """Our Q4_K / Q6_K bytes, read by the gguf package's dequantizer: every value within one step of its
    sub-block (half a step plus the 6/8-bit scale's rounding), and a smaller RMS error than the 32-block
    types of the same width (Q4_0; Q6_K against 4x Q8_0's), which is what the K-quants' search buys."""
    torch.manual_seed(0)
    w = torch.randn(32, 512) * 0.02
    w[0, :256] = 0.0  # an all-zero super-block
    w[1, :16] = 0.0  # an all-zero sub-block
    w[2, 5] = 0.3  # an outlier
    w[3, :256] = w[3, :256].abs() + 0.01  # all positive (Q4_K's min clamps at 0)
    errors = {}
    for kind, quantize, size in [("Q4_K", quantize_q4_k, 144), ("Q6_K", quantize_q6_k, 210),
                                 ("Q4_0", quantize_q4_0, 18 * 8), ("Q8_0", quantize_q8_0, 34 * 8)]:
        data = quantize(w).numpy()
        assert data.shape == (32, 2 * size)
        back = torch.from_numpy(gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, kind)))
        errors[kind] = (back - w).pow(2).mean().sqrt() / w.std()
        if kind == "Q4_K":  # one step of each 32-value sub-block: its range / 15
            sub = w.reshape(-1, 32)
            step = (sub.amax(1) - sub.amin(1).clamp(max=0)) / 15
            assert ((back - w).abs().reshape(-1, 32) <= step[:, None] + 1e-6).all()
        if kind == "Q6_K":  # one step of each 16-value sub-block: max |x| / 32
            step = w.reshape(-1, 16).abs().amax(1) / 32
            assert ((back - w).abs().reshape(-1, 16) <= step[:, None] + 1e-6).all()
        assert (back[0, :256] == 0).all()
        if kind != "Q4_K":  # symmetric codes keep zeros exact; Q4_K's sub-block of 32 has a min offset
            assert (back[1, :16] == 0).all()
    assert errors["Q4_K"] < errors["Q4_0"] and errors["Q6_K"] < 4 * errors["Q8_0"]
    assert errors["Q4_K"] < 0.08 and errors["Q6_K"] < 0.02


def test_q4_k_m_chooses_types_as_llama_cpp_does():
    """llama.cpp's llama_tensor_get_type for LLAMA_FTYPE_MOSTLY_Q4_K_M, on a 32-layer dense model."""
    six = [i for i in range(32) if q4_k_m_type(f"blk.{i}.attn_v.weight", 4096, 32, False) == "q6_k"]
    assert six == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert q4_k_m_type("blk.6.ffn_down.weight", 11008, 32, False) == "q6_k"  # 11008 = 43 x 256
    assert q4_k_m_type("blk.5.ffn_down.weight", 11008, 32, False) == "q4_k"
    assert q4_k_m_type("blk.5.ffn_down.weight", 11008 + 32, 32, False) == "q5_0"  # rows not a multiple of 256
    assert q4_k_m_type("blk.0.attn_q.weight", 4096, 32, False) == "q4_k"
    assert q4_k_m_type("output.weight", 4096, 32, False) == "q6_k"
    assert q4_k_m_type("token_embd.weight", 4096, 32, False) == "q4_k"
    assert q4_k_m_type("token_embd.weight", 4096, 32, True) == "q6_k"  # tied: the output's type
    assert q4_k_m_type("token_embd.weight", 4000, 32, True) == "q8_0"


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


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory):
    """Rows of 256 (K-quant super-blocks), 2 layers (use_more_bits picks layer 1 of 2), tied embeddings."""
    import pydoc_data.topics

    from lmstack.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(iter(list(pydoc_data.topics.topics.values())[:30]), "bpe", 384)
    torch.manual_seed(0)
    cfg = lmstack.ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=256, num_layers=2, num_heads=4,
                              num_kv_heads=2, intermediate_size=256, max_seq_len=64, tie_word_embeddings=True,
                              eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    directory = tmp_path_factory.mktemp("wide") / "model"
    lmstack.save_model(lmstack.Transformer(cfg), directory, extra_files=tokenizer.files())
    return directory


@pytest.mark.slow  # transformers' GGUF load: ~90 s on the shared machine, as the q8_0 case
def test_q4_k_m_file_loads_in_transformers_with_llama_cpps_types(wide_llama_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small element-wise ops: a second thread on a busy machine costs 10x and more
    try:
        _check_q4_k_m(transformers, wide_llama_dir, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _check_q4_k_m(transformers, wide_llama_dir, tmp_path):
    model = lmstack.load_model(wide_llama_dir).eval()
    path = tmp_path / "model-q4_k_m.gguf"
    export_gguf(model, wide_llama_dir, path, "q4_k_m")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["token_embd.weight"] == "Q6_K" and "output.weight" not in types  # tied
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(2)] == ["Q4_K", "Q6_K"]
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(2)] == ["Q4_K", "Q6_K"]
    assert types["blk.1.attn_q.weight"] == types["blk.1.ffn_up.weight"] == "Q4_K"
    peer = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                             dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        ours, theirs = model(ids), peer(ids).logits
    assert (ours - theirs).abs().max() <= 0.2 * ours.abs().max()


@pytest.mark.slow
def test_q4_k_m_blocks_equal_llama_cpps_own_quantizer(wide_llama_dir, tmp_path):
    """llama.cpp (llama-cpp-python, built from PyPI's source) quantizes our f32 export to Q4_K_M: every tensor gets
    the type ours got, at least 90% of its K-quant blocks are the same bytes, and the rest are as close to the
    weights. ggml's reference search sums in float32 one element at a time (and the compiler may fuse multiply-adds),
    torch sums pairwise: in a few blocks a near-tie in the scale search goes the other way."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    model = lmstack.load_model(wide_llama_dir).eval()
    export_gguf(model, wide_llama_dir, tmp_path / "f32.gguf", "f32")
    export_gguf(model, wide_llama_dir, tmp_path / "ours.gguf", "q4_k_m")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, 1
    assert llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(), str(tmp_path / "theirs.gguf").encode(),
                                          ctypes.byref(params)) == 0
    weights = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
               for t in gguf.GGUFReader(str(tmp_path / "f32.gguf")).tensors}
    ours = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "ours.gguf")).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "theirs.gguf")).tensors}
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        kind = tensor.tensor_type
        assert kind == theirs[name].tensor_type, name
        if kind.name not in ("Q4_K", "Q6_K"):
            assert (tensor.data == theirs[name].data).all(), name
            continue
        size = {"Q4_K": 144, "Q6_K": 210}[kind.name]
        a, b = (torch.from_numpy(t.data.view("uint8").reshape(-1, size).copy()) for t in (tensor, theirs[name]))
        assert (a == b).all(1).float().mean() >= 0.9, f"{name}: {(a != b).any(1).sum()} of {len(a)} blocks differ"

        def error(t):
            return (torch.from_numpy(gguf.quants.dequantize(t.data, kind).copy()) - weights[name]).pow(2).mean().sqrt()

        assert error(tensor) <= 1.01 * error(theirs[name]), name


def test_sentencepiece_style_unigram_exports_as_llama_cpps_ugm_and_transformers_reads_it(tmp_path):
    """A unigram tokenizer goes out as llama.cpp's "t5" (UGM) vocabulary: pieces, their log-probability
    scores and unk; transformers' GGUF reader rebuilds a unigram tokenizer from it that splits text into
    lmstack's ids. (That reader fixes unk at id 2 and collapses runs of spaces, as T5 does, so the texts
    here have known characters and single spaces; llama.cpp reads unk from the file.)"""
    import json
    import pydoc_data.topics

    transformers = pytest.importorskip("transformers")
    from lmstack.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(iter(list(pydoc_data.topics.topics.values())[:30]), "unigram", 400)
    cfg = lmstack.ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_layers=1, num_heads=4,
                              num_kv_heads=2, intermediate_size=128, max_seq_len=64,
                              eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    directory = tmp_path / "model"
    lmstack.save_model(lmstack.Transformer(cfg), directory, extra_files=tokenizer.files())
    path = tmp_path / "model.gguf"
    export_gguf(lmstack.load_model(directory), directory, path, "f32")

    reader = gguf.GGUFReader(str(path))
    spec = json.loads((directory / "tokenizer.json").read_text())["model"]
    field = reader.fields["tokenizer.ggml.model"]
    assert bytes(field.parts[field.data[0]]).decode() == "t5"
    scores = reader.fields["tokenizer.ggml.scores"]
    assert [float(scores.parts[i][0]) for i in scores.data][:len(spec["vocab"])] == \
        pytest.approx([score for _, score in spec["vocab"]], rel=1e-6)
    unk = reader.fields["tokenizer.ggml.unknown_token_id"]
    assert int(unk.parts[unk.data[0]][0]) == spec["unk_id"]

    peer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["The quick brown fox, def f(x): return x", "Python's 'with' statement is used to wrap blocks.",
                 "If the expression list is empty, None is substituted."]:
        assert peer.encode(text, add_special_tokens=False) == tokenizer.encode(text), text


def test_unsupported_models_are_refused(tmp_path, llama_dir):
    gpt2 = lmstack.Transformer(lmstack.preset("gpt2", num_layers=1, hidden_size=64, num_heads=2, vocab_size=300,
                                              bos_token_id=None, eos_token_id=None))
    with pytest.raises(ConfigError, match="GGUF export supports Llama-family models; this one has "
                                          "position_kind=learned"):
        export_gguf(gpt2, llama_dir, tmp_path / "x.gguf", "q8_0")


def test_export_cli(llama_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "lmstack", "export", "gguf", "--model", str(llama_dir),
                             "--type", "q4_0", "--out", str(tmp_path / "m.gguf")], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "q4_0" in result.stdout and (tmp_path / "m.gguf").exists()


def _llama_cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    """n tokens of llama.cpp's greedy continuation of ids (no repetition penalty, as lmstack's greedy)."""
    tokens = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        tokens.append(token)
        if len(tokens) == n:
            return tokens
    return tokens


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
    assert _llama_cpp_greedy(llm, ids, 16) == ours


@pytest.mark.slow
def test_llama_cpp_runs_a_unigram_export_with_lmstacks_tokens_and_greedy_text(tmp_path):
    """The UGM ("t5") vocabulary in llama.cpp itself: lmstack's ids for texts (a double space included, which
    transformers' reader would collapse) and the same greedy continuation."""
    import pydoc_data.topics

    llama_cpp = pytest.importorskip("llama_cpp")
    from lmstack.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(iter(list(pydoc_data.topics.topics.values())[:30]), "unigram", 400)
    torch.manual_seed(0)
    cfg = lmstack.ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_layers=1, num_heads=4,
                              num_kv_heads=2, intermediate_size=128, max_seq_len=64,
                              eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    directory = tmp_path / "model"
    lmstack.save_model(lmstack.Transformer(cfg), directory, extra_files=tokenizer.files())
    model = lmstack.load_model(directory).eval()
    export_gguf(model, directory, tmp_path / "model.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "model.gguf"), n_ctx=64, verbose=False, n_threads=1)
    for text in ["The quick brown fox, def f(x): return x", "If the expression list is empty,  None is substituted."]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text
    ids = tokenizer.encode("The quick brown fox")
    ours = lmstack.generate(model, None, [ids], max_new_tokens=12, ignore_eos=True).token_ids[0]
    assert _llama_cpp_greedy(llm, ids, 12) == ours
