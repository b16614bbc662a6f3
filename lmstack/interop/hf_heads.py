"""Reward models as Hugging Face sequence-classification directories (`score.weight`), both directions.

A ScoreModel (lmstack.model.heads) is written as transformers' <Family>ForSequenceClassification with one
label: the family's body tensors under their usual names (`model.*`, GPT-2's `transformer.*`) plus
`score.weight` (1, d), and a config.json naming that architecture with `num_labels` 1 and the pad id.
`transformers.AutoModelForSequenceClassification.from_pretrained(dir)` then gives the same scores:
transformers reads the score at each row's last token that is not `pad_token_id`, lmstack at the last
token of the attention mask, which is the same token for right-padded batches whose pad id appears only
as padding (so the pad id must not be the EOS a sequence ends with; `save_score_model` checks that the
config has a pad id).

Reading accepts such a directory written by transformers too, and `score_model_from_lm` starts a reward
model from any causal LM directory (the body's weights; a fresh score head).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmstack.atomic import atomic_dir
from lmstack.config import ModelConfig
from lmstack.errors import CheckpointError
from lmstack.interop.hf import _IGNORED_SUFFIXES, hf_to_lmstack, lmstack_to_hf, load_model, read_config
from lmstack.interop.hf_config import config_to_hf, hf_incompatibility
from lmstack.interop.safetensors_io import tensor_files
from lmstack.model.heads import ScoreModel
from lmstack.model.transformer import Transformer

SEQUENCE_CLASSIFICATION = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
                           "qwen2": "Qwen2ForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}
SCORE = "score.weight"
WEIGHTS = "model.safetensors"


def score_config_json(config: ModelConfig, dtype: str = "float32") -> dict:
    """config.json of a one-label <Family>ForSequenceClassification for `config`."""
    problem = hf_incompatibility(config)
    if problem is not None:
        raise CheckpointError(f"this model cannot be written as a Hugging Face sequence classifier: {problem}")
    if config.pad_token_id is None:
        raise CheckpointError("a reward model needs pad_token_id in its config (transformers finds each row's last "
                              "token by it): set model.config.pad_token_id to the tokenizer's pad id")
    hf = config_to_hf(config, dtype)
    hf.update(architectures=[SEQUENCE_CLASSIFICATION[config.family]], id2label={"0": "LABEL_0"},
              label2id={"LABEL_0": 0}, num_labels=1)
    return hf


def write_score_weights(model: ScoreModel, directory: str | Path, state: dict[str, torch.Tensor] | None = None,
                        dtype: torch.dtype = torch.float32) -> None:
    """Write config.json and model.safetensors for `model` (or for `state`, its state dict) into `directory`."""
    directory = Path(directory)
    state = state if state is not None else model.state_dict()
    body = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    tensors = {name: t.detach().to("cpu", dtype).contiguous().clone() for name, t in lmstack_to_hf(body, model.config)}
    tensors[SCORE] = state[SCORE].detach().to("cpu", dtype).contiguous().clone()
    save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})
    config_json = score_config_json(model.config, str(dtype).removeprefix("torch."))
    (directory / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")


def save_score_model(model: ScoreModel, path: str | Path, extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Atomically write `model` as a sequence-classification directory (plus e.g. the tokenizer's files)."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_score_weights(model, tmp)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content) if isinstance(content, bytes) else (tmp / name).write_text(content)
    return path


def read_score_state(directory: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A sequence-classification directory -> (config, state dict in ScoreModel names), checked by name and shape."""
    directory = Path(directory)
    config = read_config(directory)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in ScoreModel(Transformer(config)).state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for hf_name, file in tensor_files(directory).items():
        if hf_name.endswith(_IGNORED_SUFFIXES):
            continue
        with safe_open(file, framework="pt") as f:
            tensor = f.get_tensor(hf_name)
        converted = [(SCORE, tensor)] if hf_name == SCORE else [
            ("backbone." + name, t) for name, t in hf_to_lmstack(hf_name, tensor, config)]
        for name, t in converted:
            if name not in expected:
                raise CheckpointError(f"{directory}: unexpected tensor {hf_name} for a {config.family} reward model "
                                      "(is it a causal LM or another architecture? a reward model has score.weight)")
            if tuple(t.shape) != tuple(expected[name]):
                raise CheckpointError(f"{directory}: tensor {hf_name} has shape {tuple(t.shape)}, expected "
                                      f"{tuple(expected[name])}")
            state[name] = t
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{directory}: missing tensor {missing[0]} ({len(missing)} missing); a reward model "
                              "directory holds the body and score.weight")
    return config, state


def load_score_model(path: str | Path, dtype: torch.dtype = torch.float32) -> ScoreModel:
    """A reward model from a sequence-classification directory (lmstack's or transformers')."""
    config, state = read_score_state(path)
    with torch.device("meta"):
        model = ScoreModel(Transformer(config))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    model.backbone.reset_buffers()
    return model


def score_model_from_lm(path_or_model: str | Path | Transformer, pad_token_id: int | None = None) -> ScoreModel:
    """A reward model initialised from a causal LM (a directory or a model): its body, a fresh score head."""
    model = path_or_model if isinstance(path_or_model, Transformer) else load_model(path_or_model)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return ScoreModel(model)


def is_score_model_dir(path: str | Path) -> bool:
    """True when `path` holds a sequence-classification config.json."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    try:
        architectures = json.loads(file.read_text(encoding="utf-8")).get("architectures") or []
    except json.JSONDecodeError:
        return False
    return any(a.endswith("ForSequenceClassification") for a in architectures)


__all__ = ["SEQUENCE_CLASSIFICATION", "is_score_model_dir", "load_score_model", "read_score_state",
           "save_score_model", "score_config_json", "score_model_from_lm", "write_score_weights"]
