"""New tokens grow the embedding and the head with rows at the mean of the old ones (hand-computed), old rows and
old logits unchanged, a tied head still tied."""

from __future__ import annotations

import pytest
import torch

import lmstack
from lmstack.adapters import resize_vocab


@pytest.mark.parametrize("tie", [True, False])
def test_new_rows_start_at_the_mean_and_old_logits_stay(tie):
    torch.manual_seed(0)
    config = lmstack.ModelConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=4,
                                 intermediate_size=64, max_seq_len=32, tie_word_embeddings=tie)
    model = lmstack.Transformer(config).eval()
    embed, head = model.model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    x = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        before = model(x)
        assert resize_vocab(model, 53) == 50 and model.config.vocab_size == 53
        after = model(x)
    torch.testing.assert_close(after[..., :50], before)
    grown = model.model.embed_tokens.weight
    assert grown.shape == (53, 32) and torch.equal(grown[:50], embed)
    torch.testing.assert_close(grown[50:], embed.mean(0).expand(3, -1))
    assert (model.lm_head.weight is grown) == tie
    if not tie:
        torch.testing.assert_close(model.lm_head.weight[50:], head.mean(0).expand(3, -1))
    assert resize_vocab(model, 40) == 53 and model.config.vocab_size == 53  # never shrinks
