"""New tokens' rows for the methods that train no rows (prompt, P-tuning, prefix, IA3, bottleneck): when a run adds
tokens, their rows train beside the method (only those rows: old rows stay bitwise equal), the adapter directory
carries them as peft's modules_to_save, peft loads it with the same logits (new tokens in the input included), and
lmstack loads it back exactly. Prompt and P-tuning train the head's rows only (peft embeds their input with the
base embedding)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lmstack
from lmstack.adapters import (
    BottleneckConfig,
    IA3Config,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    apply_bottleneck,
    apply_ia3,
    apply_p_tuning,
    apply_prefix_tuning,
    apply_prompt_tuning,
    has_adapters,
    is_adapter_parameter,
    resize_vocab,
    save_adapter,
    train_new_rows,
    unload,
)
from tests.adapters.conftest import peft, transformers
from tests.parity.hf_models import build_hf_model

P, NEW = 3, 2
pytestmark = pytest.mark.filterwarnings("ignore")
HEAD_ONLY = ("prompt", "p_tuning")


def adapt(model, method: str) -> None:
    if method == "prompt":
        apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=P))
    elif method == "p_tuning":
        apply_p_tuning(model, PTuningConfig(num_virtual_tokens=P, encoder_hidden_size=16))
    elif method == "prefix":
        apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=P, encoder_hidden_size=16))
    elif method == "ia3":
        apply_ia3(model, IA3Config())
    else:
        apply_bottleneck(model, BottleneckConfig(bottleneck_size=4))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """tied -> a saved tiny Llama (transformers), tied or untied head."""
    out = {}
    for tied in (True, False):
        directory = tmp_path_factory.mktemp(f"rows-base-{tied}")
        build_hf_model("llama", directory, tie_word_embeddings=tied)
        out[tied] = directory
    return out


def trained(directory, method: str, steps: int = 3):
    """An lmstack model grown by NEW tokens, the method applied, new rows training, a few AdamW steps on batches
    whose inputs and targets use the new tokens. -> (model, old vocab, base parameters before training)."""
    torch.manual_seed(0)
    model = lmstack.load_model(directory)
    old = resize_vocab(model, model.config.vocab_size + NEW)
    new_ids = list(range(old, old + NEW))
    adapt(model, method)
    train_new_rows(model, new_ids, head_only=method in HEAD_ONLY)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = (model.model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, old + NEW, (2, 10), generator=g)
        x[:, ::3] = torch.tensor(new_ids).repeat(4)[:x[:, ::3].shape[1]]
        loss = model(x[:, :-1], targets=x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), old, before, rows


@pytest.mark.parametrize("method", ["prompt", "ia3", "prefix", "p_tuning", "bottleneck"])
@pytest.mark.parametrize("tied", [True, False])
def test_only_the_method_and_the_new_rows_train(bases, method, tied):
    model, old, before, (embed, head) = trained(bases[tied], method)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any("trainable_tokens_delta" in n for n in changed) and any("tokens_delta" not in n for n in changed)
    assert all(is_adapter_parameter(n) for n in changed), changed
    new_embed, new_head = model.model.embed_tokens.weight.detach(), model.lm_head.weight.detach()
    assert torch.equal(new_embed[:old], embed[:old]) and torch.equal(new_head[:old], head[:old])
    assert not torch.equal(new_head[old:], head[old:])
    assert torch.equal(new_embed[old:], embed[old:]) == (method in HEAD_ONLY)
    assert not torch.equal(new_head[old], new_head[old + 1])  # the two markers are no longer one row


def peft_base(directory, old: int, tied: bool):
    """The transformers model grown like resize_vocab does it (new rows at the mean of the old ones)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory)
    hf.resize_token_embeddings(old + NEW, mean_resizing=False)
    with torch.no_grad():
        for weight in {id(w): w for w in (hf.get_input_embeddings().weight, hf.get_output_embeddings().weight)}.values():
            weight[old:] = weight[:old].mean(0, keepdim=True)
    return hf


@pytest.mark.parametrize("method", ["prompt", "ia3", "prefix", "p_tuning", "bottleneck"])
@pytest.mark.parametrize("tied", [True, False])
def test_the_adapter_carries_the_rows_to_peft_and_back(bases, tmp_path, method, tied):
    model, old, _, _ = trained(bases[tied], method)
    save_adapter(model, tmp_path / "a")
    fields = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    prefix = "base_model." if method in ("prompt", "p_tuning", "prefix") else "base_model.model."
    expected = ["lm_head"] if method in HEAD_ONLY else ["embed_tokens", "lm_head"]
    assert sorted(fields["modules_to_save"]) == expected
    assert (f"{prefix}lm_head.weight" in keys) and ((f"{prefix}model.embed_tokens.weight" in keys) == (
        method not in HEAD_ONLY))
    x = torch.randint(0, old + NEW, (2, 9), generator=torch.Generator().manual_seed(5))
    x[:, 2], x[:, 5] = old, old + 1  # the new tokens in the input, too
    with torch.no_grad():
        ours = model(x)
        reloaded = lmstack.load_model(bases[tied], adapter=tmp_path / "a").eval()
        torch.testing.assert_close(reloaded(x), ours, atol=1e-5, rtol=1e-5)
        if method != "bottleneck":  # lmstack's own format: peft has no bottleneck adapters
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = peft.PeftModel.from_pretrained(peft_base(bases[tied], old, tied), tmp_path / "a").eval()
                logits = theirs(x).logits
            torch.testing.assert_close(logits[:, P:] if method in HEAD_ONLY else logits, ours, atol=1e-5, rtol=1e-5)
    save_adapter(reloaded, tmp_path / "b")  # what was loaded is written again unchanged
    first, second = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    if method == "ia3":  # merge: the rows are written into plain modules, a model save_model writes as is
        with torch.no_grad():
            torch.testing.assert_close(unload(reloaded)(x), ours, atol=1e-5, rtol=1e-5)
        assert not has_adapters(reloaded)


@pytest.mark.parametrize("method", ["ia3", "prompt"])
def test_a_chatml_run_gives_the_two_markers_their_own_rows(tmp_path, method):
    """The bug this fixes: a tied base without ChatML's markers, fine-tuned with prompt tuning or IA3, kept
    <|im_start|> and <|im_end|> at one mean row, so their logits were bitwise equal and <|im_end|> never won."""
    from lmstack.train.recipes.finetune import build_engine
    from tests.finetune.conftest import make_base
    from tests.finetune.test_recipe import config, write_data

    base = make_base(tmp_path / "base")
    sections = {"prompt": {"prompt_tuning.num_virtual_tokens": 4}, "ia3": {}}[method]
    result = build_engine(config(base, write_data(tmp_path / "d.jsonl"), tmp_path / "run", method=method,
                                 **sections)).fit()
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    start, end = report["new_token_ids"]
    model = lmstack.load_model(base, adapter=result.checkpoint).eval()
    head = model.lm_head.weight.detach()
    assert not torch.equal(head[start], head[end])
    with torch.no_grad():
        logits = model(torch.tensor([[start, 5, 6, end, 7]]))
    assert not torch.equal(logits[..., start], logits[..., end])


@pytest.mark.parametrize("method,saved", [("ia3", ["embed_tokens"]), ("prompt", ["embed_tokens", "lm_head"]),
                                          ("prefix", ["embed_tokens"])])
def test_a_peft_adapter_with_modules_to_save_loads_with_peft_logits(bases, tmp_path, method, saved):
    """peft's side of the same rules, on a tied base: a tied head does not follow an embed_tokens copy, and prompt
    tuning's input never reads one."""
    directory = bases[True]
    if method == "ia3":
        cfg = peft.IA3Config(task_type="CAUSAL_LM", modules_to_save=saved)
    elif method == "prompt":
        cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, modules_to_save=saved)
    else:
        cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, modules_to_save=saved)
    adapted = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(directory), cfg).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "modules_to_save" in name or "ia3_l" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=g))
    adapted.save_pretrained(tmp_path / "a")
    x = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = adapted(x).logits
        ours = lmstack.load_model(directory, adapter=tmp_path / "a").eval()(x)
    torch.testing.assert_close(ours, theirs[:, P:] if method == "prompt" else theirs, atol=1e-5, rtol=1e-5)
