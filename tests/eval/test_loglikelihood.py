"""The scorer against a plain full-sequence forward, at every batch size; lm-eval's rolling windows."""

from __future__ import annotations

import random

import pytest
import torch

import lmstack
from lmstack.errors import DataError
from lmstack.eval.loglikelihood import Item, Scorer, pack_rows, rolling_windows, strided_windows


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    config = lmstack.ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                 intermediate_size=128, max_seq_len=64, init_std=0.1)
    return lmstack.Transformer(config).eval()


def random_items(n: int, seed: int = 0) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        context = [rng.randrange(300) for _ in range(rng.randrange(1, 30))]
        choices = rng.choice([1, 2, 4, 5])
        items.append(Item(context, [[rng.randrange(300) for _ in range(rng.randrange(1, 14))]
                                    for _ in range(choices)]))
    return items


def reference(model, item: Item) -> list[tuple[float, bool]]:
    """Each continuation alone, as lm-eval computes it: one forward of (context + continuation)[:-1]."""
    out = []
    for continuation in item.continuations:
        ids = torch.tensor([item.context + continuation])
        with torch.no_grad():
            logprobs = model(ids[:, :-1]).log_softmax(-1)[0, -len(continuation):]  # (n, V)
        target = torch.tensor(continuation)
        out.append((logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())))
    return out


def test_scores_equal_the_full_forward_and_do_not_depend_on_batch_size(model):
    items = random_items(20)
    expected = [reference(model, item) for item in items]
    per_batch_size = {}
    for batch_size in (1, 4, 16):
        scorer = Scorer(model, batch_size=batch_size)
        scores = scorer.score(items)
        per_batch_size[batch_size] = scores
        for item_scores, item_expected in zip(scores, expected):
            assert [s.logprob for s in item_scores] == pytest.approx([e[0] for e in item_expected], abs=2e-5)
            assert [s.greedy for s in item_scores] == [e[1] for e in item_expected]
        assert scorer.stats.truncated == 0 and scorer.stats.items == 20
    # the same per-item log-likelihoods (hence the same predictions) at batch sizes 1, 4 and 16
    for batch_size in (4, 16):
        for a, b in zip(per_batch_size[1], per_batch_size[batch_size]):
            assert [s.logprob for s in a] == pytest.approx([s.logprob for s in b], rel=1e-6, abs=1e-5)
            best_a = max(range(len(a)), key=lambda i: a[i].logprob)
            assert best_a == max(range(len(b)), key=lambda i: b[i].logprob)


def test_a_shared_context_runs_once_per_item(model):
    # a tree row: the 40 context tokens once, then each choice minus its last token, all in one forward
    items = [Item(list(range(1, 41)), [[5, 6, 7], [8, 9], [10, 11, 12, 13]])]
    scorer = Scorer(model, batch_size=8)
    scorer.score(items)
    assert scorer.stats.forwards == 1 and scorer.stats.tokens_run == 40 + 2 + 1 + 3
    # a tree that would overrun the context (40 + 4 x 9 > 64): the context into a KV cache once (stage 1),
    # then 4 rows of (10 - 1) continuation inputs over copies of it (stage 2)
    long_choices = Item(list(range(1, 41)), [list(range(j, j + 10)) for j in range(4)])
    scorer = Scorer(model, batch_size=8)
    scores = scorer.score([long_choices])
    assert scorer.stats.forwards == 2 and scorer.stats.tokens_run == 40 + 4 * 9
    assert [s.logprob for s in scores[0]] == pytest.approx([r[0] for r in reference(model, long_choices)], abs=2e-5)


def test_short_items_share_tree_rows():
    # each forward takes its longest item as row capacity; a row starts with the longest item left and the
    # shortest ones that fit in the rest of it join it
    lengths = [10, 9, 8, 6, 3, 2, 1, 1]
    forwards = pack_rows(list(range(8)), lengths, rows_per_forward=2)
    assert forwards == [[[0], [1, 7]], [[2], [3, 6]], [[4], [5]]]
    assert all(sum(lengths[i] for i in row) <= max(lengths[r[0]] for r in rows) for rows in forwards for row in rows)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_tree_rows_equal_a_transformers_forward_per_choice(tmp_path, family):
    """The packed tree forward against transformers' own model, one plain forward per (context, choice): choices
    of different lengths, items of different lengths packed together, and (mistral) a sliding window of 7 that
    the tree mask must apply along each branch."""
    from tests.parity.hf_models import build_hf_model

    hf = build_hf_model(family, tmp_path)
    ours = lmstack.load_model(tmp_path).eval()
    rng = random.Random(3)
    items = []
    for n in range(12):
        context = [rng.randrange(211) for _ in range(rng.choice([1, 2, 5, 12, 30]))]
        items.append(Item(context, [[rng.randrange(211) for _ in range(rng.randrange(1, 9))]
                                    for _ in range(rng.choice([2, 3, 4]))]))
    scorer = Scorer(ours, batch_size=3)
    scores = scorer.score(items)
    assert scorer.stats.forwards < len(items) / 3  # rows hold several items
    for item, item_scores in zip(items, scores):
        for continuation, score in zip(item.continuations, item_scores):
            ids = torch.tensor([item.context + continuation])
            with torch.no_grad():
                logprobs = hf(ids[:, :-1]).logits.log_softmax(-1)[0, -len(continuation):]  # (n, V)
            target = torch.tensor(continuation)
            assert score.logprob == pytest.approx(logprobs.gather(-1, target[:, None]).sum().item(), abs=1e-5)
            assert score.greedy == bool((logprobs.argmax(-1) == target).all())
            assert score.tokens == len(continuation)


def test_long_contexts_are_truncated_from_the_left_or_refused_when_strict(model):
    long_item = Item(list(range(1, 61)), [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [3]])  # 60 + 10 - 1 > 64
    scorer = Scorer(model, batch_size=2)
    scores = scorer.score([long_item, Item([1, 2], [[3], [4]])])
    assert scorer.stats.truncated == 1
    kept = Item(long_item.context[-55:], long_item.continuations)  # 64 + 1 - 10 context tokens fit
    assert [s.logprob for s in scores[0]] == pytest.approx([r[0] for r in reference(model, kept)], abs=2e-5)
    with pytest.raises(DataError, match="exceed the model's context"):
        Scorer(model, strict=True).score([long_item])
    with pytest.raises(DataError, match="does not fit"):
        Scorer(model).score([Item([1], [list(range(1, 70))])])
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        Scorer(model).score([Item([1, 999], [[2]])])


def test_a_learned_position_model_splits_a_batch_that_would_overrun_its_positions():
    torch.manual_seed(0)
    config = lmstack.ModelConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                                 intermediate_size=64, max_seq_len=32, position_kind="learned",
                                 norm_kind="layernorm", mlp_kind="gelu", init_std=0.1)
    gpt = lmstack.Transformer(config).eval()
    # one item's long context beside another's long choice: P + C - 1 > 32 in one batch
    items = [Item(list(range(1, 30)), [[1, 2], [3]]), Item([5], [list(range(1, 25)), [7, 8]])]
    scores = Scorer(gpt, batch_size=2).score(items)
    for item, item_scores in zip(items, scores):
        assert [s.logprob for s in item_scores] == pytest.approx([r[0] for r in reference(gpt, item)], abs=2e-5)


def lm_eval_windows(tokens, prefix, max_length):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    return [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, prefix, max_length, 1)]


@pytest.mark.parametrize("length", [1, 7, 64, 65, 200, 256])
def test_rolling_windows_are_lm_evals(length):
    tokens = list(range(10, 10 + length))
    ours = [(w.context, w.continuations[0]) for w in rolling_windows(tokens, 0, 64)]
    assert ours == lm_eval_windows(tokens, 0, 64)
    assert [t for _, c in ours for t in c] == tokens  # every token predicted exactly once


@pytest.mark.parametrize("stride", [7, 40, 64])
def test_strided_windows_score_every_token_once_with_at_most_the_window(stride, model):
    tokens = [random.Random(stride).randrange(300) for _ in range(100)]
    windows = strided_windows(tokens, 0, 64, stride)
    assert [t for w in windows for t in w.continuations[0]] == tokens
    assert all(len(w.context) + len(w.continuations[0]) - 1 <= 64 for w in windows)
    if stride == 64:  # no overlap: the same windows as lm-eval's rolling ones except the last one's context
        assert [w.continuations for w in windows] == [w.continuations for w in rolling_windows(tokens, 0, 64)]
    # more context per token can only be scored consistently: the total equals summing the windows alone
    total = sum(s[0].logprob for s in Scorer(model, batch_size=4).score(windows))
    alone = sum(reference(model, w)[0][0] for w in windows)
    assert total == pytest.approx(alone, abs=1e-3)


def test_tree_rows_under_a_prompt_tuning_prefix_equal_the_full_forward():
    """Virtual tokens (kv_prefix) every query sees and positions shifted by them: the tree mask gains their keys."""
    from lmstack.adapters.prompt import PromptTuningConfig, apply_prompt_tuning

    torch.manual_seed(2)
    config = lmstack.ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                 intermediate_size=128, max_seq_len=64, init_std=0.1)
    model = lmstack.Transformer(config).eval()
    apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=5))
    items = [Item([7, 8, 9], [[1, 2], [3, 4, 5, 6], [10]]), Item(list(range(20, 30)), [[5], [6, 7, 8]]),
             Item([40], [[41, 42, 43], [44, 45]])]
    scorer = Scorer(model, batch_size=2)
    scores = scorer.score(items)
    assert scorer.stats.forwards == 1  # all three trees in one forward of two rows
    # windows leave room for the 5 virtual tokens: a long item's context keeps its last 64 - 5 + 1 - 4 tokens
    long_item = Item(list(range(1, 60)), [[1, 2, 3, 4], [5, 6]])
    items.append(long_item)
    scorer = Scorer(model, batch_size=2)
    scores += scorer.score([long_item])
    assert scorer.stats.truncated == 1
    for item, item_scores in zip(items, scores):
        kept = Item(item.context[-56:], item.continuations)
        assert [s.logprob for s in item_scores] == pytest.approx([r[0] for r in reference(model, kept)], abs=2e-5)
