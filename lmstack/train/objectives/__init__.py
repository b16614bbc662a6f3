"""Training objectives: `objective(model, batch) -> Loss` (a summed loss, the items it scored, metrics).

    loss.py   Loss: the contract between an objective and the engine (sum + count, never a mean)
    lm.py     causal_lm_loss (pretraining; SFT uses it with prompt targets set to IGNORE_INDEX), cross_entropy
    sft.py    sft_loss: the same over packed / padded instruction batches (attention mask, position ids)

Later objectives (SFT, distillation, reward model, the DPO family, PPO, GRPO) live beside these.
"""

from lmstack.train.objectives.lm import IGNORE_INDEX, causal_lm_loss, cross_entropy
from lmstack.train.objectives.loss import Loss

__all__ = ["IGNORE_INDEX", "Loss", "causal_lm_loss", "cross_entropy"]
