"""Shared pieces for the alignment tests: tiny random Hugging Face models (saved locally, no downloads) and
their lmstack twins, in float64 so that parity with trl is a test of the formulas, not of rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.parity.hf_models import build_hf_model


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory) -> dict:
    """A tiny random Llama policy and a perturbed copy as the reference: HF (float64) and lmstack (float64)."""
    import lmstack

    root = tmp_path_factory.mktemp("align-models")
    policy_hf = build_hf_model("llama", root / "policy")
    ref_hf = build_hf_model("llama", root / "unused")
    with torch.no_grad():
        generator = torch.Generator().manual_seed(7)
        for p in ref_hf.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    ref_hf.save_pretrained(root / "reference")
    return {"policy_hf": policy_hf.double(), "ref_hf": ref_hf.double(),
            "policy": lmstack.load_model(root / "policy").double(),
            "reference": lmstack.load_model(root / "reference").double(),
            "dir": root}


def random_pairs(n: int, seed: int, vocab: int = 211, equal_chosen: bool = False):
    """n EncodedPairs of random ids with uneven prompt / completion lengths (ids >= 2: 0 pads, 1 is EOS)."""
    from lmstack.data.preference import EncodedPair

    g = torch.Generator().manual_seed(seed)

    def ids(low: int, high: int) -> list[int]:
        length = int(torch.randint(low, high, (1,), generator=g))
        return torch.randint(2, vocab, (length,), generator=g).tolist()

    pairs = []
    for i in range(n):
        if equal_chosen:  # every chosen row (prompt + answer) the same length
            prompt, chosen = ids(3, 4), ids(5, 6)
        else:
            prompt, chosen = ids(2, 6), ids(1, 7)
        pairs.append(EncodedPair(prompt, chosen, ids(1, 7), i))
    return pairs


@pytest.fixture(scope="session")
def task_model_dir(tmp_path_factory) -> Path:
    """A tiny random character-level model for the synthetic tasks (lmstack.align.task_models' alphabet)."""
    import lmstack
    from lmstack.align.task_models import task_tokenizer

    tokenizer = task_tokenizer()
    torch.manual_seed(0)
    config = lmstack.ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                                 intermediate_size=64, max_seq_len=24, tie_word_embeddings=True,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    directory = tmp_path_factory.mktemp("task-model") / "model"
    lmstack.save_model(lmstack.Transformer(config), directory, extra_files=tokenizer.files())
    return directory
