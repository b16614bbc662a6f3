"""Tiny base models for the fine-tuning tests: a character tokenizer (no chat markers, so fine-tuning with
ChatML must add them) and a small random Llama-style model, saved together as a model directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmstack
from lmstack.tokenizer import train_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. 0123456789 + = ? ! ' , ; : - ( ) "
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ What is Sort these numbers Write the letters\n")


def make_base(directory: Path, tie: bool = True, template: str | None = None) -> Path:
    tokenizer = train_tokenizer(iter([TEXT] * 3), "char", None, chat_template=template)
    torch.manual_seed(0)
    config = lmstack.ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                                 num_kv_heads=2, intermediate_size=64, max_seq_len=128, tie_word_embeddings=tie,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = lmstack.Transformer(config)
    lmstack.save_model(model, directory, extra_files=tokenizer.files())
    return directory


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("ft-base") / "base")


@pytest.fixture(scope="session")
def untied_base_dir(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("ft-base-untied") / "base", tie=False)


@pytest.fixture(scope="session")
def chatml_tokenizer():
    return train_tokenizer(iter([TEXT] * 3), "bpe", 300, chat_template="chatml")
