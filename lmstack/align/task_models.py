"""Starting models for the synthetic tasks: a character tokenizer, a small transformer, a short SFT run.

    lmstack align sft --task arithmetic --out runs/arith-sft      (train_task_model)

The SFT run is supervised fine-tuning on the task's demonstrations (lmstack.align.tasks) from a random
initialisation: next-token cross-entropy on the completion tokens only, the prompt masked (causal_lm_loss
with IGNORE_INDEX targets), through the one training engine. Stopped early on purpose, it leaves a model
that is right some of the time: room for GRPO / DPO to show what they add.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmstack.align.tasks import arithmetic_sft, sorted_letters_sft
from lmstack.config import ModelConfig
from lmstack.data.preference import EncodedExample, ExampleBatches, collate_completions
from lmstack.errors import ConfigError
from lmstack.interop.hf import save_model
from lmstack.model.transformer import Transformer
from lmstack.tokenizer import Tokenizer, train_tokenizer
from lmstack.train.config import OptimConfig, ScheduleConfig, TrainConfig
from lmstack.train.engine import Engine
from lmstack.train.objectives import Loss, causal_lm_loss

TASKS = {"arithmetic": arithmetic_sft, "sorted_letters": sorted_letters_sft}
ALPHABET = "abcdefgh:0123456789+=- "


def task_tokenizer() -> Tokenizer:
    """A character tokenizer over the tasks' alphabet (plus bos / eos / pad / unk)."""
    return train_tokenizer(iter([ALPHABET]), "char", None)


def sft_objective(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Loss:
    """Cross-entropy on the completion tokens (the targets outside the completion are IGNORE_INDEX)."""
    return causal_lm_loss(model, batch["input_ids"], batch["targets"])


def train_task_model(task: str, out: str | Path, steps: int = 300, examples: int = 4000, batch_size: int = 32,
                     lr: float = 3e-3, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                     progress: bool = False) -> Path:
    """Train a small SFT model for `task` and save it (with its tokenizer) as a Hugging Face directory `out`."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    tokenizer = task_tokenizer()
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                         num_heads=4, num_kv_heads=4, intermediate_size=hidden_size * 2, max_seq_len=32,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Transformer(config)
    encoded = []
    for i, record in enumerate(TASKS[task](examples, seed)):
        encoded.append(EncodedExample(tokenizer.encode(record["prompt"]),
                                      tokenizer.encode(record["completion"]) + [tokenizer.eos_token_id], index=i))
    batches = ExampleBatches(encoded, lambda items: collate_completions(items, tokenizer.pad_token_id),
                             batch_size, seed=seed)
    train = TrainConfig(steps=steps, batch_size=batch_size, seq_len=config.max_seq_len, eval_every=0, seed=seed,
                        progress=progress, peak_flops=1e12)  # MFU is meaningless here: skip measuring the peak
    Engine(model, sft_objective, batches, train, OptimConfig(lr=lr, weight_decay=0.0),
           ScheduleConfig(kind="cosine", warmup_steps=min(20, steps // 10), min_lr=lr / 10)).fit()
    return save_model(model.eval(), out, extra_files=tokenizer.files())



def sample_answers(model: torch.nn.Module, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int = 8,
                   temperature: float = 0.0, seed: int = 0, batch_size: int = 256) -> list[str]:
    """The model's answers to text prompts (greedy by default), special tokens removed."""
    from lmstack.generate import generate

    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids = [tokenizer.encode(p) for p in prompts[start:start + batch_size]]
        out = generate(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        answers += [tokenizer.decode(t, skip_special_tokens=True) for t in out.token_ids]
    return answers


__all__ = ["ALPHABET", "TASKS", "sample_answers", "sft_objective", "task_tokenizer", "train_task_model"]
