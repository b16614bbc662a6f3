"""Reward models: the score head, the Hugging Face sequence-classification directory, and the Bradley-Terry
loss against trl's RewardTrainer on the same batch."""

from __future__ import annotations

import pytest
import torch

import lmstack
from lmstack.data.preference import collate_pairs
from lmstack.errors import CheckpointError
from lmstack.interop.hf_heads import load_score_model, save_score_model, score_model_from_lm
from lmstack.model.heads import ScoreModel, last_token_index
from lmstack.train.objectives.reward import RewardConfig, RewardObjective, bradley_terry_losses
from tests.align.conftest import random_pairs
from tests.parity.hf_models import build_hf_model

transformers = pytest.importorskip("transformers")


def _padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def test_last_token_index_either_padding_side():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saved_reward_model_loads_in_transformers_with_the_same_scores(tmp_path, family):
    build_hf_model(family, tmp_path / "lm")
    model = score_model_from_lm(tmp_path / "lm", pad_token_id=0).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    save_score_model(model, tmp_path / "rm")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert type(hf).__name__.endswith("ForSequenceClassification")
    ids, mask = _padded([[5, 9, 13, 2, 7], [4, 4, 8], [100, 3, 11, 19, 20, 21, 22]], pad=0)
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # and back: the directory (written by us, then by transformers) loads into lmstack with the same scores
    hf.save_pretrained(tmp_path / "rm-hf")
    for directory in (tmp_path / "rm", tmp_path / "rm-hf"):
        again = load_score_model(directory).eval()
        with torch.no_grad():
            torch.testing.assert_close(again(ids, mask), ours, rtol=1e-5, atol=1e-5)


def test_reward_model_needs_a_pad_id_and_a_causal_lm_is_not_one(tmp_path):
    build_hf_model("llama", tmp_path / "lm")
    with pytest.raises(CheckpointError, match="pad_token_id"):
        save_score_model(score_model_from_lm(tmp_path / "lm"), tmp_path / "rm")
    with pytest.raises(CheckpointError, match="unexpected tensor lm_head.weight"):
        load_score_model(tmp_path / "lm")


def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    margin = torch.tensor([0.5, 0.0])
    expected = torch.tensor([-torch.log(torch.sigmoid(torch.tensor(0.5))), -torch.log(torch.sigmoid(torch.tensor(-1.0)))])
    torch.testing.assert_close(bradley_terry_losses(chosen, rejected, margin), expected)
    centred = bradley_terry_losses(chosen, rejected, margin, center_coef=0.1)
    torch.testing.assert_close(centred - expected, 0.1 * torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("margin,center", [(False, None), (True, 0.01)])
def test_reward_loss_equals_trl_reward_trainer(tmp_path, margin, center):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    build_hf_model("llama", tmp_path / "lm")
    ours_model = score_model_from_lm(tmp_path / "lm", pad_token_id=0)
    with torch.no_grad():
        ours_model.score.weight.normal_(0, 1.0)
    save_score_model(ours_model, tmp_path / "rm")
    ours_model = ours_model.double()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").double()

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(211)},
                                                                              unk_token="t0")),
                                  eos_token="t1", pad_token="t0")
    args = trl.RewardConfig(output_dir=str(tmp_path / "out"), report_to=[], bf16=False, use_cpu=True,
                            center_rewards_coefficient=center)
    ds = datasets.Dataset.from_list([{"chosen": "t5 t6", "rejected": "t5 t7"}] * 4)
    trainer = trl.RewardTrainer(model=hf, args=args, train_dataset=ds, processing_class=tok)

    pairs = random_pairs(5, seed=11)
    if margin:
        for i, p in enumerate(pairs):
            p.margin = 0.25 * i
    batch = collate_pairs(pairs, pad_id=0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if margin:
        inputs["margin"] = batch["margin"].double()
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, dict(inputs))
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    ours = RewardObjective(RewardConfig(center_coef=center))(ours_model, batch)
    assert abs(ours.mean().item() - theirs.item()) < 1e-6
    assert abs(ours.metrics["accuracy"].item() / 5 - metrics["accuracy"]) < 1e-6
    assert abs(ours.metrics["margin"].item() / 5 - metrics["margin"]) < 1e-6


def test_score_model_reads_the_last_real_token_only():
    """Padding after a sequence changes nothing; the score is the head at the last token."""
    torch.manual_seed(0)
    model = ScoreModel(lmstack.Transformer(lmstack.preset("llama-tiny", vocab_size=64))).eval()
    ids = torch.tensor([[3, 4, 5, 0, 0]])
    with torch.no_grad():
        padded = model(ids, torch.tensor([[1, 1, 1, 0, 0]]))
        alone = model(ids[:, :3], torch.ones(1, 3, dtype=torch.long))
        hidden = model.backbone.hidden_states(ids[:, :3])[0, -1]
    torch.testing.assert_close(padded, alone)
    torch.testing.assert_close(alone[0], model.score(hidden)[0])


def test_unload_folds_lora_into_a_reward_model_with_tied_embeddings():
    """A reward model's backbone has no LM head (nn.Identity): unload must not look for one to untie."""
    from lmstack.adapters import LoraConfig, apply_lora, has_adapters, unload

    backbone = lmstack.Transformer(lmstack.preset("llama-tiny", vocab_size=64, tie_word_embeddings=True))
    model = ScoreModel(backbone).eval()
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)  # a trained adapter: B = 0 would fold in nothing
    ids = torch.randint(0, 64, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    adapted = model(ids, mask)
    plain = unload(model)
    assert not has_adapters(plain)
    torch.testing.assert_close(plain(ids, mask), adapted, rtol=1e-5, atol=1e-5)
