"""GGUF export for llama.cpp: Llama-family models with their tokenizer and chat template, F32 / F16 / Q8_0 / Q4_0
and Q4_K_M (the K-quant blocks and llama.cpp's per-tensor choice are in lmstack/quant/kquants.py).

Block formats (ggml's, computed here in torch; bytes tested equal to the `gguf` package's quantizer):
- Q8_0: blocks of 32 along a row; d = max|x| / 127 stored as fp16, q = round-half-away(x / d) int8: 34 bytes.
- Q4_0: blocks of 32; d = (the value of largest magnitude, with its sign) / -8 as fp16,
  q = min(15, trunc(x / d + 8.5)), x ~ (q - 8) d; byte j holds element j (low nibble) and j + 16
  (high nibble): 18 bytes.
  Both are computed in fp32 with separate multiply and add, as the gguf package does (llama.cpp's C
  reference may fuse them into an FMA and differ in a last bit of a rounding tie).

Tensors: llama.cpp's names (token_embd, blk.N.attn_q, ..., output_norm, output); q_proj and k_proj rows
permuted from Hugging Face's rotate-half RoPE layout to ggml's interleaved one, as llama.cpp's
convert_hf_to_gguf.py does (and transformers' GGUF loader undoes). Norms stay F32. With --type q4_0 the
token embedding and an untied output matrix are Q8_0 (llama.cpp's own Q4_0 files keep the output at Q6_K),
because their errors land directly on every token's input and logits. --type q4_k_m follows llama.cpp's
per-tensor rules exactly (lmstack/quant/kquants.py).

Tokenizer: byte-level BPE (tokenizer.ggml.model "gpt2", pre-tokenizer "gpt-2") with its merges, or
SentencePiece-style unigram ("t5", llama.cpp's UGM: pieces with their log-probability scores, unk, a space
prefix); special tokens as control tokens, bos / eos / pad ids and `tokenizer.chat_template`. Other
tokenizer kinds and other architectures are refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lmstack.errors import ConfigError
from lmstack.quant.kquants import q4_k_m_type, quantize_q4_k, quantize_q6_k

TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")
BLOCK = 32


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """ggml's roundf, written as the gguf package writes it: floor(a) + floor(2 (a - floor(a))), signed."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """(rows, K) float -> (rows, K / 32 * 34) uint8 Q8_0 blocks."""
    blocks = w.detach().float().reshape(-1, BLOCK)  # (n, 32)
    d = blocks.abs().amax(1, keepdim=True) / 127
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _round_half_away(blocks * inverse).to(torch.int8)
    out = torch.cat([d.half().view(torch.uint8), q.view(torch.uint8)], 1)  # (n, 2 + 32)
    return out.reshape(w.shape[0], -1)


def quantize_q4_0(w: torch.Tensor) -> torch.Tensor:
    """(rows, K) float -> (rows, K / 32 * 18) uint8 Q4_0 blocks."""
    blocks = w.detach().float().reshape(-1, BLOCK)  # (n, 32)
    index = blocks.abs().argmax(1, keepdim=True)
    d = blocks.gather(1, index) / -8
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(blocks * inverse + 8.5).clamp(0, 15).to(torch.uint8)  # (n, 32)
    packed = q[:, :16] | (q[:, 16:] << 4)  # element j low, j + 16 high
    out = torch.cat([d.half().view(torch.uint8), packed], 1)  # (n, 2 + 16)
    return out.reshape(w.shape[0], -1)


def permute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q / k projection (heads * D, d) from rotate-half order to ggml's interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_exportable(config) -> None:
    problems = []
    if config.position_kind != "rope":
        problems.append(f"position_kind={config.position_kind} (llama needs rope)")
    if config.norm_kind != "rmsnorm":
        problems.append(f"norm_kind={config.norm_kind} (llama needs rmsnorm)")
    if config.mlp_kind != "swiglu":
        problems.append(f"mlp_kind={config.mlp_kind} (llama needs swiglu)")
    if config.qkv_bias or config.out_bias or config.mlp_bias:
        problems.append("biases in the linears")
    if config.rope_scaling.kind != "none":
        problems.append(f"rope_scaling={config.rope_scaling.kind}")
    if config.sliding_window is not None:
        problems.append(f"sliding_window={config.sliding_window}")
    if problems:
        raise ConfigError(f"GGUF export supports Llama-family models; this one has {', '.join(problems)} "
                          f"(family {config.family})")


def _tokenizer_metadata(writer, tokenizer_dir: Path, config) -> None:
    path = tokenizer_dir / "tokenizer.json"
    if not path.exists():
        raise ConfigError(f"{tokenizer_dir}: no tokenizer.json; GGUF files carry the tokenizer, export needs it")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    pre = json.dumps(spec.get("pre_tokenizer"))
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    if model.get("type") == "BPE" and "ByteLevel" in pre:
        _byte_level_bpe(writer, model, special, config)
    elif model.get("type") == "Unigram" and "Metaspace" in pre:
        _unigram(writer, model, special, config, path)
    else:
        raise ConfigError(f"{path}: a {model.get('type')} tokenizer; GGUF export supports byte-level BPE "
                          f"(lmstack tokenizer train --kind bpe), which llama.cpp reads as 'gpt2', and "
                          f"SentencePiece-style unigram (--kind unigram), which it reads as 't5'")
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(config, key)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(False)  # lmstack's prompts carry their own bos where the template puts one
    tok_config = tokenizer_dir / "tokenizer_config.json"
    template = None
    if tok_config.exists():
        template = json.loads(tok_config.read_text(encoding="utf-8")).get("chat_template")
    if template is None and (tokenizer_dir / "chat_template.jinja").exists():
        template = (tokenizer_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str):
        writer.add_chat_template(template)


def _token_table(pieces: dict[str, int], special: dict[str, int], config) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types (1 normal, 3 control, 5 unused for ids past the tokenizer's
    vocabulary that the embedding still has)."""
    size = max(config.vocab_size, max([*pieces.values(), *special.values()]) + 1)
    tokens, types = [f"[PAD{i}]" for i in range(size)], [5] * size
    for token, i in {**pieces, **special}.items():
        tokens[i], types[i] = token, 3 if token in special else 1
    return tokens, types


def _byte_level_bpe(writer, model: dict, special: dict[str, int], config) -> None:
    tokens, types = _token_table(dict(model["vocab"]), special, config)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for GPT-2's split regex (ByteLevel's); it refuses "gpt2"
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)


def _unigram(writer, model: dict, special: dict[str, int], config, path: Path) -> None:
    """SentencePiece-style unigram: llama.cpp's UGM tokenizer ("t5"), which segments by the highest total log
    probability as the unigram model does (its "llama" SPM tokenizer merges pairs greedily, which is right for
    BPE-trained SentencePiece vocabularies, not for these). The pieces' scores are the unigram log
    probabilities; '▁' marks a word start and a space prefix is added. What GGUF cannot carry: the NFKC
    normaliser (llama.cpp's UGM normalises through a SentencePiece precompiled charsmap, which only
    SentencePiece's builder writes), so text that is not already NFKC-normalised may split differently."""
    if model.get("byte_fallback"):
        raise ConfigError(f"{path}: a unigram tokenizer with byte fallback; GGUF export supports it without")
    pieces = {piece: i for i, (piece, _) in enumerate(model["vocab"])}
    tokens, types = _token_table(pieces, special, config)
    scores = [0.0] * len(tokens)
    for i, (_, score) in enumerate(model["vocab"]):
        scores[i] = float(score)
    unk = model.get("unk_id")
    if unk is not None:
        types[unk] = 2  # unknown
        writer.add_unk_token_id(int(unk))
    writer.add_tokenizer_model("t5")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(True)
    writer.add_remove_extra_whitespaces(False)


def export_gguf(model, tokenizer_dir: str | Path, out: str | Path, qtype: str = "q8_0") -> dict:
    """Write `model` (a full-precision lmstack Transformer) as a GGUF file; returns {tensor: type} counts."""
    import gguf

    if qtype not in TYPES:
        raise ConfigError(f"--type {qtype}: choose one of {', '.join(TYPES)}")
    if getattr(model, "quantization_config", None):
        raise ConfigError("GGUF export starts from the full-precision model directory, not a quantized one "
                          "(quantizing twice adds both errors); pass the original --model")
    config = model.config
    _check_exportable(config)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(Path(tokenizer_dir).name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2, "q4_k_m": 15}[qtype])  # llama_ftype
    if qtype not in ("f32", "f16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer_metadata(writer, Path(tokenizer_dir), config)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    counts: dict[str, int] = {}

    def add(name: str, tensor: torch.Tensor, kind: str) -> None:
        tensor = tensor.detach().float().cpu()
        if kind == "q4_k_m" and tensor.dim() == 2:
            kind = q4_k_m_type(name, tensor.shape[-1], config.num_layers, config.tie_word_embeddings)
        if tensor.dim() == 1 or kind == "f32" or tensor.shape[-1] % BLOCK:
            writer.add_tensor(name, tensor.numpy())
            kind = "f32"
        elif kind == "f16":
            writer.add_tensor(name, tensor.half().numpy())
        else:
            raw = getattr(gguf.GGMLQuantizationType, kind.upper())
            quantizer = {"q8_0": quantize_q8_0, "q4_0": quantize_q4_0, "q4_k": quantize_q4_k, "q6_k": quantize_q6_k}
            if kind in quantizer:
                data = quantizer[kind](tensor).numpy()
            else:  # q5_0, Q4_K_M's fallback for rows that are not a multiple of 256: the gguf package's quantizer
                data = gguf.quants.quantize(tensor.numpy(), raw)
            writer.add_tensor(name, data, raw_dtype=raw)
        counts[kind] = counts.get(kind, 0) + 1

    edge = "q8_0" if qtype == "q4_0" else qtype  # embeddings / output one step up (see the module docstring)
    add("token_embd.weight", model.model.embed_tokens.weight, edge)
    for i, block in enumerate(model.model.layers):
        for module_name, gguf_name in names.items():
            weight = block.get_submodule(module_name).weight
            if module_name == "self_attn.q_proj":
                weight = permute_rope(weight, config.num_heads)
            elif module_name == "self_attn.k_proj":
                weight = permute_rope(weight, config.num_kv_heads)
            add(f"blk.{i}.{gguf_name}.weight", weight, qtype)
    add("output_norm.weight", model.model.norm.weight, "f32")
    if not config.tie_word_embeddings:
        add("output.weight", model.lm_head.weight, edge)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def gguf_bytes_per_parameter(path: str | Path) -> float:
    """File size over parameters stored (tensor payloads only), for the report."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    params = sum(int(np.prod(t.shape)) for t in reader.tensors)
    return sum(int(t.n_bytes) for t in reader.tensors) / params


__all__ = ["TYPES", "export_gguf", "gguf_bytes_per_parameter", "permute_rope", "quantize_q4_0", "quantize_q8_0"]
