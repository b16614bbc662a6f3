"""Tiny random reference models built with transformers and saved with save_pretrained (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ["llama", "mistral", "qwen2", "gpt2"]


def build_hf_model(family: str, directory: Path, **overrides):
    """A tiny random transformers model of `family`, saved to `directory`; returns the model (eval, fp32)."""
    import transformers

    torch.manual_seed(1234)
    common = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False)
    if family == "llama":
        config = transformers.LlamaConfig(**{**common, "rope_theta": 500.0, **overrides})
        model = transformers.LlamaForCausalLM(config)
    elif family == "mistral":
        config = transformers.MistralConfig(**{**common, "sliding_window": 7, **overrides})
        model = transformers.MistralForCausalLM(config)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**{**common, "tie_word_embeddings": True, **overrides})
        model = transformers.Qwen2ForCausalLM(config)
    elif family == "gpt2":
        # GPT-2's special id is its last token (50256 of 50257): keep it inside the tiny vocabulary
        config = transformers.GPT2Config(**{**dict(vocab_size=211, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                                   bos_token_id=210, eos_token_id=210, resid_pdrop=0.0,
                                                   embd_pdrop=0.0, attn_pdrop=0.0), **overrides})
        model = transformers.GPT2LMHeadModel(config)
    else:
        raise ValueError(family)
    # Random init gives near-zero biases and unit norms; perturb every parameter so each one matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.eval()
    model.save_pretrained(directory)
    return model
