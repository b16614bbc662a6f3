"""BERT directories (transformers' BertModel / BertForPreTraining / BertForMaskedLM /
BertForSequenceClassification, and sentence-transformers models built on them) <-> lmstack's Encoder.

Parameter names are the same up to the `bert.` prefix, which a bare BertModel checkpoint leaves out.
Which heads a checkpoint has is read from its tensors (cls.predictions -> mlm, cls.seq_relationship ->
nsp, classifier -> classifier, bert.pooler -> pooler), so a sentence-transformers directory (BertModel
weights) loads as a plain encoder. Its pooling (1_Pooling/config.json), normalisation (a Normalize
entry in modules.json) and max_seq_length (sentence_bert_config.json) become `EncoderConfig.pooling`
and are written back the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmstack.errors import CheckpointError, ConfigError
from lmstack.interop.safetensors_io import load_into, tensor_files, unique_state, write_tensors
from lmstack.model.configs import EncoderConfig, SentencePooling
from lmstack.model.encoder import Encoder
from lmstack.schema import read_json

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_TRUNK = ("embeddings.", "encoder.", "pooler.")
_POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                  "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}


def _lmstack_name(hf_name: str) -> str | None:
    """A BERT tensor name -> the Encoder's (None: not a weight: position_ids buffers, the tied decoder)."""
    if hf_name.endswith("position_ids") or hf_name.startswith("cls.predictions.decoder."):
        return None  # a buffer; the decoder is the word embeddings and its bias is cls.predictions.bias
    return f"bert.{hf_name}" if hf_name.startswith(_TRUNK) else hf_name


def config_from_hf(hf: dict[str, Any], names: set[str], source: str) -> EncoderConfig:
    """config.json plus the checkpoint's tensor names (which decide the heads) -> EncoderConfig."""
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"{source}: position_embedding_type {hf['position_embedding_type']!r} is not supported "
                          "(absolute only)")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ConfigError(f"{source}: a BERT decoder (is_decoder / add_cross_attention) is not supported")
    names = {_lmstack_name(n) for n in names} - {None}
    heads = [head for head, prefix in (("mlm", "cls.predictions."), ("nsp", "cls.seq_relationship."),
                                       ("classifier", "classifier.")) if any(n.startswith(prefix) for n in names)]
    labels = hf.get("id2label")
    label_names = [labels[k] for k in sorted(labels, key=int)] if isinstance(labels, dict) and labels else None
    if label_names is not None and all(n == f"LABEL_{i}" for i, n in enumerate(label_names)):
        label_names = None  # transformers' default names: no names
    try:
        return EncoderConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf.get("hidden_size", 768),
            num_layers=hf.get("num_hidden_layers", 12), num_heads=hf.get("num_attention_heads", 12),
            intermediate_size=hf.get("intermediate_size", 3072), max_seq_len=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2), mlp_kind=_ACTIVATIONS[act],
            norm_eps=float(hf.get("layer_norm_eps", 1e-12)), dropout=float(hf.get("hidden_dropout_prob", 0.1)),
            attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
            init_std=float(hf.get("initializer_range", 0.02)), pooler=any(n.startswith("bert.pooler.") for n in names),
            heads=heads, num_labels=int(hf.get("num_labels") or (len(labels) if labels else 2)),
            classifier_dropout=hf.get("classifier_dropout"), pad_token_id=hf.get("pad_token_id", 0),
            labels=label_names if "classifier" in heads and label_names
            and len(label_names) == int(hf.get("num_labels") or len(label_names)) else None)
    except KeyError as e:
        raise ConfigError(f"{source}: required key {e.args[0]!r} is missing") from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def config_to_hf(config: EncoderConfig, dtype: str = "float32") -> dict[str, Any]:
    """EncoderConfig -> config.json for the transformers class its heads make up."""
    heads = set(config.heads)
    if heads == {"classifier"}:
        architecture = "BertForSequenceClassification"
    elif heads == {"mlm", "nsp"}:
        architecture = "BertForPreTraining"
    elif heads == {"mlm"} and not config.pooler:
        architecture = "BertForMaskedLM"
    elif not heads:
        architecture = "BertModel"
    else:
        architecture = None  # a combination transformers has no class for: loads as BertModel + ignored heads
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[config.mlp_kind]
    out = dict(architectures=[architecture] if architecture else ["BertModel"], model_type="bert",
               vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
               num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
               max_position_embeddings=config.max_seq_len, type_vocab_size=config.type_vocab_size, hidden_act=act,
               layer_norm_eps=config.norm_eps, hidden_dropout_prob=config.dropout,
               attention_probs_dropout_prob=config.attention_dropout, initializer_range=config.init_std,
               pad_token_id=config.pad_token_id, position_embedding_type="absolute",
               classifier_dropout=config.classifier_dropout, torch_dtype=dtype, tie_word_embeddings=True)
    if "classifier" in heads:
        names = config.labels or [f"LABEL_{i}" for i in range(config.num_labels)]
        out["id2label"] = {str(i): name for i, name in enumerate(names)}
        out["label2id"] = {name: i for i, name in enumerate(names)}
    return out


# ------------------------------------------------------------------------------------------- sentence-transformers
def read_pooling(directory: Path) -> SentencePooling | None:
    """The sentence-transformers pooling of a directory (None when it has no 1_Pooling module)."""
    modules_path = directory / "modules.json"
    if not modules_path.is_file():
        return None
    modules = read_json(modules_path, CheckpointError)
    types = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in modules if isinstance(m, dict)}
    if "Pooling" not in types:
        return None
    settings = read_json(directory / types["Pooling"] / "config.json", CheckpointError)
    modes = [mode for key, mode in _POOLING_MODES.items() if settings.get(key)]
    if len(modes) != 1:
        raise CheckpointError(f"{directory / types['Pooling'] / 'config.json'}: exactly one of "
                              f"{', '.join(_POOLING_MODES)} must be true (lmstack supports one pooling mode)")
    sbert = directory / "sentence_bert_config.json"
    max_tokens = read_json(sbert, CheckpointError).get("max_seq_length") if sbert.is_file() else None
    return SentencePooling(mode=modes[0], normalize="Normalize" in types, max_tokens=max_tokens)


def pooling_files(config: EncoderConfig) -> dict[str, str]:
    """The sentence-transformers files that describe `config.pooling` (empty without one)."""
    pooling = config.pooling
    if pooling is None:
        return {}
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    settings = {"word_embedding_dimension": config.hidden_size,
                **{key: mode == pooling.mode for key, mode in _POOLING_MODES.items()}}
    files = {"modules.json": json.dumps(modules, indent=2) + "\n",
             "1_Pooling/config.json": json.dumps(settings, indent=2) + "\n"}
    if pooling.max_tokens is not None:
        files["sentence_bert_config.json"] = json.dumps({"max_seq_length": pooling.max_tokens,
                                                         "do_lower_case": False}, indent=2) + "\n"
    return files


# ------------------------------------------------------------------------------------------- load / save
def read_encoder_config(directory: str | Path) -> EncoderConfig:
    directory = Path(directory)
    path = directory / "config.json"
    hf = read_json(path, CheckpointError, "not found; a model directory needs config.json")
    config = config_from_hf(hf, set(tensor_files(directory)), str(path))
    pooling = read_pooling(directory)
    return config.replace(pooling=pooling) if pooling is not None else config


def load_encoder(directory: str | Path, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> Encoder:
    """A BERT / sentence-transformers directory -> Encoder (fp32 on the CPU unless `dtype`)."""
    directory = Path(directory)
    config = read_encoder_config(directory)
    with torch.device("meta"):
        model = Encoder(config)
    load_into(model, directory, _lmstack_name, dtype)
    return model.to(device) if device is not None else model


def write_encoder(model: Encoder, directory: Path, max_shard_bytes: int, dtype: torch.dtype | None) -> None:
    """Write config.json, the weights and (with a pooling config) the sentence-transformers files."""
    config = model.config
    state = unique_state(model, dtype)
    if not config.heads:  # BertModel: no prefix (what sentence-transformers and AutoModel expect)
        state = {name.removeprefix("bert."): t for name, t in state.items()}
    write_tensors(state, directory, max_shard_bytes)
    dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config_to_hf(config, dtype_name), indent=2) + "\n")
    for name, text in pooling_files(config).items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
