"""Prompt tuning, P-tuning and prefix tuning against peft (logits within 1e-5, adapter directories both ways),
gradients only into the method's parameters, and generation with the virtual tokens.

peft's logits for prompt / P-tuning include the P virtual positions: the real tokens' logits are [:, P:].
"""

from __future__ import annotations

import json

import pytest
import torch

import lmstack
from lmstack.adapters import (
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    apply_p_tuning,
    apply_prefix_tuning,
    apply_prompt_tuning,
    disable_adapters,
    save_adapter,
)
from lmstack.adapters.prefix import PrefixTuning
from lmstack.adapters.prompt import PromptEncoder
from lmstack.errors import CheckpointError, ConfigError
from lmstack.generate import generate
from tests.adapters.conftest import ids, peft, transformers

P = 3
pytestmark = pytest.mark.filterwarnings("ignore")  # peft's notes on prompt learning and position ids


def peft_config(method: str, **kw):
    if method == "prompt":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **kw)
    if method == "p_tuning":
        return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=16, **kw)
    return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **kw)


def peft_logits(model, method: str, x: torch.Tensor) -> torch.Tensor:
    logits = model(x).logits
    return logits if method == "prefix" else logits[:, P:]


CASES = [("llama", "prompt"), ("gpt2", "prompt"), ("llama", "p_tuning"), ("qwen2", "p_tuning"), ("llama", "prefix"),
         ("gpt2", "prefix"), ("qwen2", "prefix")]


@pytest.mark.parametrize("family,method", CASES)
def test_peft_adapter_loads_in_lmstack(hf_base, tmp_path, family, method):
    directory, _ = hf_base(family)
    extra = {"prefix_projection": True, "encoder_hidden_size": 16} if method == "prefix" else {}
    adapted = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(directory),
                                  peft_config(method, **extra)).eval()
    if method == "prefix":  # peft's prefix MLP output starts near zero: make the prefix matter
        with torch.no_grad():
            adapted.prompt_encoder.default.transform[2].bias.normal_(0, 1.0)
    adapted.save_pretrained(tmp_path / "adapter")
    x = ids()
    with torch.no_grad():
        expected = peft_logits(adapted, method, x)
        ours = lmstack.load_model(directory, adapter=tmp_path / "adapter").eval()
        got = ours(x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        with disable_adapters(ours):
            assert (ours(x) - got).abs().max() > 1e-3  # the virtual tokens changed something


def _ours(directory, method: str):
    model = lmstack.load_model(directory)
    if method == "prompt":
        apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=P))
    elif method == "p_tuning":
        apply_p_tuning(model, PTuningConfig(num_virtual_tokens=P, encoder_hidden_size=16))
    else:
        apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=P, encoder_hidden_size=16))
        with torch.no_grad():
            model.kv_prefix.transform[2].bias.normal_(0, 1.0)
    return model.eval()


@pytest.mark.parametrize("family,method", CASES)
def test_lmstack_adapter_loads_in_peft(hf_base, tmp_path, family, method):
    directory, _ = hf_base(family)
    ours = _ours(directory, method)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(directory))
    x = ids()
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(directory),
                                                tmp_path / "adapter").eval()
        torch.testing.assert_close(ours(x), peft_logits(theirs, method, x), atol=1e-5, rtol=1e-5)
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == {"prompt": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix": "PREFIX_TUNING"}[method]


@pytest.mark.parametrize("family,method", [("llama", "p_tuning"), ("gpt2", "prefix")])
def test_training_modules_compute_what_peft_computes(hf_base, family, method):
    """The encoders that train (P-tuning's MLP / LSTM, prefix tuning's MLP) hold peft's weights under peft's names
    and give peft's training-mode logits."""
    directory, _ = hf_base(family)
    kinds = ["MLP", "LSTM"] if method == "p_tuning" else [None]
    for kind in kinds:
        extra = {"encoder_reparameterization_type": kind} if kind else {"prefix_projection": True,
                                                                         "encoder_hidden_size": 16}
        adapted = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(directory),
                                      peft_config(method, **extra)).eval()
        ours = lmstack.load_model(directory).eval()
        if method == "p_tuning":
            apply_p_tuning(ours, PTuningConfig(num_virtual_tokens=P, encoder_hidden_size=16,
                                               encoder_reparameterization_type=kind))
        else:
            apply_prefix_tuning(ours, PrefixTuningConfig(num_virtual_tokens=P, encoder_hidden_size=16))
        state = adapted.prompt_encoder.default.state_dict()
        ours.kv_prefix.load_state_dict(state)  # strict: the same names and shapes
        x = ids()
        torch.testing.assert_close(ours(x), peft_logits(adapted, method, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "p_tuning", "prefix"])
def test_gradients_reach_only_the_method(method):
    model = lmstack.Transformer(lmstack.preset("llama-tiny"))
    {"prompt": lambda: apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=4)),
     "p_tuning": lambda: apply_p_tuning(model, PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=8)),
     "prefix": lambda: apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=8))
     }[method]()
    model.train()
    x = ids(model.config.vocab_size, 2, 12)
    model(x, targets=x).backward()
    for name, p in model.named_parameters():
        if name.startswith("kv_prefix."):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_text_init_takes_the_texts_token_embeddings():
    model = lmstack.Transformer(lmstack.preset("llama-tiny"))

    class Ids:  # a tokenizer-like object: encode(text) -> ids
        def encode(self, text):
            return [5, 9]

    apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=5, init="text", init_text="x"), Ids())
    table = model.model.embed_tokens.weight
    assert torch.equal(model.kv_prefix.embedding.weight, table[[5, 9, 5, 9, 5]])


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_generation_with_virtual_tokens_matches_the_full_forward(method):
    """Greedy decoding through the KV-cache session (prefix re-read every step) gives the tokens of an argmax
    loop over full, uncached forwards, also for rows of different lengths."""
    torch.manual_seed(0)
    model = lmstack.Transformer(lmstack.preset("llama-tiny"))
    if method == "prompt":
        apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=4))
    else:
        apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=False))
    model.eval()
    prompts = [[3, 17, 29, 41, 7], [11, 2]]
    out = generate(model, None, prompts, max_new_tokens=6, ignore_eos=True)
    for prompt, got in zip(prompts, out.token_ids):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert got == seq[len(prompt):]


def test_virtual_tokens_that_fill_the_context_are_refused():
    model = lmstack.Transformer(lmstack.preset("gpt2", num_layers=1, hidden_size=32, num_heads=2, vocab_size=50,
                                               max_seq_len=16, bos_token_id=None, eos_token_id=None,
                                               pad_token_id=None))
    with pytest.raises(ConfigError, match="num_virtual_tokens = 16 leaves no room"):
        apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=16))
    apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=10))
    with pytest.raises(ConfigError, match="10 virtual tokens .* exceed the model's max_seq_len 16"):
        model(torch.zeros(1, 8, dtype=torch.long))


def test_an_adapter_of_another_method_is_refused(hf_base, tmp_path):
    directory, _ = hf_base("llama")
    ours = _ours(directory, "prompt")
    save_adapter(ours, tmp_path / "adapter")
    config = tmp_path / "adapter" / "adapter_config.json"
    fields = json.loads(config.read_text())
    config.write_text(json.dumps({**fields, "peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="peft_type IA3, but the weights hold the tensors of a PROMPT_TUNING"):
        lmstack.load_model(directory, adapter=tmp_path / "adapter")
    config.write_text(json.dumps({**fields, "peft_type": "PREFIX_TUNING"}))
    with pytest.raises(CheckpointError, match=r"prompt_embeddings has shape \(3, 64\).*needs \(3, 128\)"):
        lmstack.load_model(directory, adapter=tmp_path / "adapter")


def test_classes_are_what_the_model_holds():
    model = lmstack.Transformer(lmstack.preset("llama-tiny"))
    apply_p_tuning(model, PTuningConfig(num_virtual_tokens=2, encoder_hidden_size=8))
    assert isinstance(model.kv_prefix, PromptEncoder)
    model = lmstack.Transformer(lmstack.preset("llama-tiny"))
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=2))
    assert isinstance(model.kv_prefix, PrefixTuning)
