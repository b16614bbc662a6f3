"""Shared pieces of the adapter tests: tiny transformers models saved locally, and peft."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.parity.hf_models import build_hf_model

transformers = pytest.importorskip("transformers")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft = pytest.importorskip("peft")


@pytest.fixture(scope="session")
def hf_base(tmp_path_factory):
    """family -> (saved directory, transformers model): built once per session."""
    cache = {}

    def get(family: str):
        if family not in cache:
            directory = tmp_path_factory.mktemp(f"base-{family}")
            cache[family] = (directory, build_hf_model(family, directory))
        return cache[family]

    return get


def ids(vocab: int = 211, batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def randomize_adapter_weights(model: torch.nn.Module, seed: int = 3) -> None:
    """LoRA's B starts at zero (and DoRA's magnitude at ||W||): give every adapter tensor random values so
    that a test can tell a loaded adapter from none."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if any(k in name for k in ("lora_A", "lora_B", "lora_magnitude_vector", "trainable_tokens_delta",
                                   "modules_to_save")):
            p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))
