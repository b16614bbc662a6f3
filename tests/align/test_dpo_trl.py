"""The DPO family against trl on the same batch: loss and logged rewards within 1e-6.

trl has no standalone loss functions: each test builds trl's own trainer (DPOTrainer, KTOTrainer,
CPOTrainer for SimPO, ORPOTrainer) around the Hugging Face twin of our model and calls the trainer's
loss computation on the identical token batch. Both models are float64 with the same weights, so the
remaining difference is the formulas.
"""

from __future__ import annotations

import pytest
import torch

from lmstack.data.preference import EncodedExample, collate_pairs, collate_unpaired
from lmstack.train.objectives.dpo import PreferenceConfig, PreferenceObjective
from lmstack.train.reference import FrozenReference
from tests.align.conftest import random_pairs

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TOL = 1e-6


def close(ours: float, theirs: float) -> bool:
    """Within 1e-6, relative for values above 1: trl takes its log-probabilities in fp32 (its fused LM head),
    which limits its own figures to ~1e-7 relative."""
    return abs(ours - theirs) <= TOL * max(1.0, abs(theirs))


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(211)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   eos_token="t1", pad_token="t0")


def _dataset():
    return datasets.Dataset.from_list([{"prompt": "t5 t6", "chosen": "t7", "rejected": "t8"}] * 4)


def _common_args(tmp_path):
    return dict(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True, per_device_train_batch_size=2)


def _trl_rows(pairs):
    """trl's DPO batch from the same pairs: [chosen rows; rejected rows], right-padded, completion mask per token."""
    rows = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    starts = [len(p.prompt) for p in pairs] * 2
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for i, (row, start) in enumerate(zip(rows, starts)):
        ids[i, :len(row)] = torch.tensor(row)
        attention[i, :len(row)] = 1
        completion[i, start:len(row)] = 1
    return ids, attention, completion


@pytest.fixture(scope="module")
def dpo_trainer(hf_pair, tmp_path_factory):
    args = trl.DPOConfig(**_common_args(tmp_path_factory.mktemp("dpo")), beta=0.1, loss_type=["sigmoid"])
    return trl.DPOTrainer(model=hf_pair["policy_hf"], ref_model=hf_pair["ref_hf"], args=args,
                          train_dataset=_dataset(), processing_class=_tokenizer())


@pytest.mark.parametrize("loss,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("hinge", 0.3, 0.0),
                                           ("ipo", 0.1, 0.0), ("robust", 0.1, 0.2)])
def test_dpo_losses_and_rewards_equal_trl(hf_pair, dpo_trainer, loss, beta, eps):
    pairs = random_pairs(5, seed=1)
    ids, attention, completion = _trl_rows(pairs)
    trainer = dpo_trainer
    trainer.loss_types, trainer.loss_weights, trainer.beta, trainer.label_smoothing = [loss], [1.0], beta, eps
    trainer._metrics["train"].clear()
    trainer.model.train()
    theirs = trainer._compute_loss(trainer.model, {"input_ids": ids, "attention_mask": attention,
                                                   "completion_mask": completion}, False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    objective = PreferenceObjective(PreferenceConfig(loss=loss, beta=beta, label_smoothing=eps),
                                    FrozenReference(hf_pair["reference"]))
    ours = objective(hf_pair["policy"], collate_pairs(pairs, pad_id=0))
    B = len(pairs)
    assert ours.count == B
    assert close(ours.mean().item(), theirs.item())
    for ours_key, trl_key in [("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                              ("reward_margin", "rewards/margins"), ("reward_accuracy", "rewards/accuracies"),
                              ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected")]:
        assert close(ours.metrics[ours_key].item() / B, metrics[trl_key]), ours_key


def test_dpo_gradient_equals_trl(hf_pair, dpo_trainer):
    """Not just the value: the gradient of the mean loss with respect to every weight matches."""
    pairs = random_pairs(4, seed=2)
    ids, attention, completion = _trl_rows(pairs)
    trainer = dpo_trainer
    trainer.loss_types, trainer.loss_weights, trainer.beta, trainer.label_smoothing = ["sigmoid"], [1.0], 0.2, 0.0
    hf, ours_model = hf_pair["policy_hf"], hf_pair["policy"]
    hf.zero_grad()
    ours_model.zero_grad()
    trainer._compute_loss(hf, {"input_ids": ids, "attention_mask": attention, "completion_mask": completion},
                          False).backward()
    objective = PreferenceObjective(PreferenceConfig(beta=0.2), FrozenReference(hf_pair["reference"]))
    objective(ours_model, collate_pairs(pairs, 0)).mean().backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours_model.named_parameters():
        scale = theirs[name].grad.abs().max().item()  # trl's fp32 log-probabilities: ~1e-7 of the gradient's size
        assert (p.grad - theirs[name].grad).abs().max().item() <= TOL * scale, name


def test_dpo_with_sft_term_equals_trl(hf_pair, dpo_trainer):
    """dpo.sft_weight α (RPO) is trl's loss_type [sigmoid, sft] with loss_weights [1, α]. trl's NLL is one mean
    over the batch's chosen tokens, ours each pair's mean: equal chosen lengths make the two the same."""
    pairs = random_pairs(4, seed=3, equal_chosen=True)
    ids, attention, completion = _trl_rows(pairs)
    trainer = dpo_trainer
    trainer.loss_types, trainer.loss_weights, trainer.beta, trainer.label_smoothing = ["sigmoid", "sft"], [1.0, 0.5], 0.1, 0.0
    trainer.model.train()
    theirs = trainer._compute_loss(trainer.model, {"input_ids": ids, "attention_mask": attention,
                                                   "completion_mask": completion}, False)
    reference = FrozenReference(hf_pair["reference"])
    ours = PreferenceObjective(PreferenceConfig(beta=0.1, sft_weight=0.5), reference)(hf_pair["policy"],
                                                                                     collate_pairs(pairs, 0))
    assert close(ours.mean().item(), theirs.item())
    plain = PreferenceObjective(PreferenceConfig(beta=0.1), reference)(hf_pair["policy"], collate_pairs(pairs, 0))
    chosen_tokens = sum(len(p.chosen) for p in pairs)
    nll = -plain.metrics["logps_chosen"].item() / chosen_tokens  # the chosen answers' mean NLL per token
    assert close(ours.mean().item(), plain.mean().item() + 0.5 * nll)
    assert close(ours.metrics["nll"].item() / len(pairs), nll)


def test_kto_equals_trl(hf_pair, tmp_path):
    """KTO on unpaired examples, with the KL reference point from the rotated (mismatched) completions."""
    pairs = random_pairs(3, seed=3)
    examples = [EncodedExample(p.prompt, c, label, 2 * i + (not label))
                for i, p in enumerate(pairs) for c, label in ((p.chosen, True), (p.rejected, False))]
    examples = examples[:5]  # an odd count: unequal desirable / undesirable numbers
    args = trl.KTOConfig(**_common_args(tmp_path), beta=0.3, desirable_weight=1.5, undesirable_weight=0.8)
    ds = datasets.Dataset.from_list([{"prompt": "t5", "completion": "t7", "label": bool(i % 2)} for i in range(4)])
    trainer = trl.KTOTrainer(model=hf_pair["policy_hf"], ref_model=hf_pair["ref_hf"], args=args, train_dataset=ds,
                             processing_class=_tokenizer())
    ours_batch = collate_unpaired(examples, pad_id=0)

    def completion_mask(prefix: str) -> torch.Tensor:
        ids, targets = ours_batch[prefix + "input_ids"], ours_batch[prefix + "targets"]
        mask = torch.zeros_like(ids)
        mask[:, 1:] = (targets[:, :-1] != -100).long()  # the token a target predicts is a completion token
        return mask

    inputs = {"input_ids": ours_batch["input_ids"], "attention_mask": ours_batch["attention_mask"],
              "completion_mask": completion_mask(""), "KL_input_ids": ours_batch["kl_input_ids"],
              "KL_attention_mask": ours_batch["kl_attention_mask"], "KL_completion_mask": completion_mask("kl_"),
              "label": ours_batch["labels"]}
    trainer.model.train()
    theirs = trainer._compute_loss(trainer.model, inputs, False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    cfg = PreferenceConfig(loss="kto", beta=0.3, desirable_weight=1.5, undesirable_weight=0.8)
    ours = PreferenceObjective(cfg, FrozenReference(hf_pair["reference"]))(hf_pair["policy"], ours_batch)
    assert close(ours.mean().item(), theirs.item())
    # z is a difference of two fp32 log-probability sums of ~-25 in trl: it is good to ~1e-6 there, not better
    assert abs(ours.metrics["kl"].item() / len(examples) - metrics["kl"]) < 1e-5
    n_desirable = sum(e.label for e in examples)
    assert close(ours.metrics["reward_desirable"].item() / n_desirable, metrics["rewards/chosen"])
    assert close(ours.metrics["reward_undesirable"].item() / (len(examples) - n_desirable), metrics["rewards/rejected"])


def _cpo_style_batch(pairs):
    """trl's CPO / ORPO batch: chosen_* and rejected_* tensors with labels -100 on prompt and padding."""
    batch = {}
    for side in ("chosen", "rejected"):
        rows = [p.prompt + getattr(p, side) for p in pairs]
        T = max(map(len, rows))
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        attention, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        for i, (p, row) in enumerate(zip(pairs, rows)):
            ids[i, :len(row)] = torch.tensor(row)
            attention[i, :len(row)] = 1
            labels[i, len(p.prompt):len(row)] = torch.tensor(getattr(p, side))
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_labels": labels})
    return batch


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (1.0, 1.2, 0.1)])
def test_simpo_equals_trl_cpo_trainer(hf_pair, tmp_path, beta, gamma, eps):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    args = CPOConfig(**_common_args(tmp_path), loss_type="simpo", cpo_alpha=0.0, beta=beta, simpo_gamma=gamma,
                     label_smoothing=eps)
    trainer = CPOTrainer(model=hf_pair["policy_hf"], args=args, train_dataset=_dataset(), processing_class=_tokenizer())
    pairs = random_pairs(5, seed=4)
    theirs, metrics = trainer.get_batch_loss_metrics(trainer.model, _cpo_style_batch(pairs))
    cfg = PreferenceConfig(loss="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=eps)
    ours = PreferenceObjective(cfg)(hf_pair["policy"], collate_pairs(pairs, 0))
    assert close(ours.mean().item(), theirs.item())
    assert close(ours.metrics["reward_chosen"].item() / 5, metrics["rewards/chosen"])
    assert close(ours.metrics["reward_margin"].item() / 5, metrics["rewards/margins"])


def test_orpo_equals_trl_orpo_trainer(hf_pair, tmp_path):
    """ORPO with trl's NLL over prompt and answer; chosen rows of equal length, where a per-pair mean NLL and
    trl's one mean over the batch's tokens coincide (see lmstack.train.objectives.dpo)."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(**_common_args(tmp_path), beta=0.25)
    trainer = ORPOTrainer(model=hf_pair["policy_hf"], args=args, train_dataset=_dataset(),
                          processing_class=_tokenizer())
    pairs = random_pairs(4, seed=5, equal_chosen=True)
    theirs, metrics = trainer.get_batch_loss_metrics(trainer.model, _cpo_style_batch(pairs))
    ours = PreferenceObjective(PreferenceConfig(loss="orpo", beta=0.25, orpo_nll="all"))(
        hf_pair["policy"], collate_pairs(pairs, 0))
    assert close(ours.mean().item(), theirs.item())
    assert close(ours.metrics["nll"].item() / 4, metrics["nll_loss"])
    assert close(ours.metrics["reward_chosen"].item() / 4, metrics["rewards/chosen"])
    assert close(ours.metrics["reward_accuracy"].item() / 4, metrics["rewards/accuracies"])
