"""Training objectives: `objective(model, batch) -> Loss` (a summed loss, the items it scored, metrics).

    loss.py   Loss: the contract between an objective and the engine (sum + count, never a mean)
    lm.py     causal_lm_loss (pretraining; SFT uses it with prompt targets set to IGNORE_INDEX), cross_entropy
    sft.py    sft_loss: the same over packed / padded instruction batches (attention mask, position ids)
    logprobs.py  summed completion log-probabilities (what the alignment objectives score)
    reward.py    RewardObjective: Bradley-Terry for a reward model (optional margin and centering)
    dpo.py       PreferenceObjective: sigmoid (DPO), hinge, ipo, robust, kto, simpo, orpo, as trl defines them
    ppo.py       PPOObjective and the rollout-side pieces: KL penalty (k1/k3), GAE, whitening, adaptive KL
    grpo.py      GRPOObjective: group advantages (grpo, dr_grpo, rloo), clipped token loss, k3 KL, aggregation
"""

from lmstack.train.objectives.lm import IGNORE_INDEX, causal_lm_loss, cross_entropy
from lmstack.train.objectives.loss import Loss

__all__ = ["IGNORE_INDEX", "Loss", "causal_lm_loss", "cross_entropy"]
