"""Training: one engine (engine.py) driven by an objective (objectives.py) and a batch source.

Pretraining, SFT, LoRA, DPO and distillation differ only in the objective, the batches and which
parameters have `requires_grad`; the loop, optimizer, schedule, checkpoints and logging are shared.
"""
