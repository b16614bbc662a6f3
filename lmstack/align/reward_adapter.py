"""A reward model trained through LoRA (`lmstack align rm` with `lora:`): adapters on the body, the score head in full.

What is saved is what peft saves for a sequence-classification LoRA (task_type SEQ_CLS): the body's
`lora_A` / `lora_B` under `base_model.model.<module>` (a Llama or GPT-2 body has the causal LM's module
names: `model.*`, `transformer.*`) and the score head as a module to save, `base_model.model.score.weight`.
transformers + peft load it onto the model the run started from and give the same scores:

    base = AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=1, pad_token_id=PAD)
    reward_model = PeftModel.from_pretrained(base, "OUT/adapter")

Checkpoints hold that adapter directory plus the trained tensors under lmstack's names (TrainableOnly's
file), which is what resume reads: exact, and independent of the peft layout.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lmstack.adapters import LoraConfig, adapters, apply_lora, unload
from lmstack.adapters.lora import LoraLinear
from lmstack.adapters.peft_format import CONFIG_FILE, PREFIX, WEIGHTS_FILE, adapter_tensors
from lmstack.atomic import atomic_dir
from lmstack.errors import ConfigError
from lmstack.model.heads import ScoreModel
from lmstack.train.checkpoint import TrainableOnly

BODY = "backbone."  # ScoreModel's name for the transformer it scores with
SCORE = "score.weight"


def apply_reward_lora(model: ScoreModel, cfg: LoraConfig) -> ScoreModel:
    """LoRA adapters on the reward model's body (everything else in it frozen); the fresh score head trains."""
    if cfg.modules_to_save or cfg.trainable_token_indices:
        raise ConfigError("align rm with lora: the score head always trains in full and a reward model has no LM "
                          "head; remove lora.modules_to_save / lora.trainable_token_indices")
    apply_lora(model.backbone, cfg)
    model.score.requires_grad_(True)
    return model


def score_adapter_tensors(model: ScoreModel, state: dict[str, torch.Tensor] | None = None
                          ) -> tuple[dict[str, torch.Tensor], dict]:
    """(peft-keyed tensors, adapter_config.json fields) of a LoRA reward model; `state` (ScoreModel names, e.g.
    a checkpoint's) overrides the values in the model."""
    state = state or {}
    body = {k[len(BODY):]: v for k, v in state.items() if k.startswith(BODY)}
    tensors, fields = adapter_tensors(model.backbone, body)
    score = state.get(SCORE, model.score.weight)
    tensors[f"{PREFIX}score.weight"] = score.detach().to("cpu", torch.float32).contiguous().clone()
    fields.update(task_type="SEQ_CLS", modules_to_save=["score"])
    return tensors, fields


def write_score_adapter(model: ScoreModel, directory: Path, base_model_name_or_path: str | None,
                        state: dict[str, torch.Tensor] | None = None) -> None:
    tensors, fields = score_adapter_tensors(model, state)
    fields["base_model_name_or_path"] = base_model_name_or_path
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(fields, indent=2) + "\n", encoding="utf-8")


def save_score_adapter(model: ScoreModel, directory: str | Path, base_model_name_or_path: str | None,
                       extra_files: dict[str, Path] | None = None) -> Path:
    """Atomically write the reward model's adapter + score head as a peft SEQ_CLS adapter directory."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        write_score_adapter(model, tmp, base_model_name_or_path)
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)
    return directory


def merged_score_model(model: ScoreModel) -> ScoreModel:
    """A copy with every LoRA adapter folded into its layer: a plain ScoreModel that save_score_model writes."""
    for name, module in adapters(model):
        if not isinstance(module, LoraLinear):
            raise ConfigError(f"{name}: only LoRA / DoRA adapters can be merged into a reward model")
    return unload(copy.deepcopy(model))


@dataclass
class ScoreAdapterStore:
    """A LoRA reward model's checkpoint: the peft SEQ_CLS adapter directory (usable as is) and the trained
    tensors under lmstack's names (what resume loads, exactly)."""

    base_model_name_or_path: str | None = None
    extra_files: dict[str, Path] = field(default_factory=dict)
    trained: TrainableOnly = field(default_factory=TrainableOnly)

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.trained.state(model)

    def write(self, model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
        write_score_adapter(model, directory, self.base_model_name_or_path, state)
        self.trained.write(model, state, directory)
        for name, source in self.extra_files.items():
            shutil.copyfile(source, directory / name)

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        return self.trained.read(directory)

    def load_into(self, model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
        self.trained.load_into(model, state, directory)


__all__ = ["ScoreAdapterStore", "apply_reward_lora", "merged_score_model", "save_score_adapter",
           "score_adapter_tensors", "write_score_adapter"]
