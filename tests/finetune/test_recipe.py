"""`lmstack finetune` end to end on a tiny base: LoRA/DoRA/full, new chat tokens, peft loading the result,
merge, resume, and the bad-input messages."""

from __future__ import annotations

import copy
import io
import json
import warnings

import pytest
import torch

import lmstack
from lmstack.adapters import is_adapter_parameter
from lmstack.cli import main as cli
from lmstack.errors import CheckpointError, ConfigError
from lmstack.schema import load_config
from lmstack.train.recipes.finetune import FinetuneConfig, build_engine

transformers = pytest.importorskip("transformers")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft = pytest.importorskip("peft")


def write_data(path, n=40):
    records = [{"instruction": f"What is {i} + {i}?", "input": "", "output": str(2 * i)} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def config(base, data, out, **overrides) -> FinetuneConfig:
    args = [f"--model={base}", f"--data.train={data}", f"--out_dir={out}", "--data.chat_template=chatml",
            "--train.steps=6", "--train.batch_size=2", "--train.seq_len=96", "--train.progress=false",
            "--optim.lr=5e-3", "--schedule.warmup_steps=0", "--train.peak_flops=1e12", "--lora.r=4", "--lora.lora_alpha=8",
            *[f"--{k}={v}" for k, v in overrides.items()]]
    return load_config(FinetuneConfig, None, args)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_run_trains_only_the_adapter_and_peft_loads_every_checkpoint(base_dir, tmp_path, method):
    cfg = config(base_dir, write_data(tmp_path / "d.jsonl"), tmp_path / "run", method=method)
    engine = build_engine(cfg)
    before = {n: p.detach().clone() for n, p in engine.base_model.named_parameters()}
    result = engine.fit()
    after = dict(engine.base_model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(is_adapter_parameter(n) for n in changed)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["added_special_tokens"] == ["<|im_start|>", "<|im_end|>"] and len(report["new_token_ids"]) == 2
    adapter = result.checkpoint
    assert (adapter / "adapter_config.json").exists() and (adapter / "tokenizer.json").exists()
    x = torch.randint(0, report["new_token_ids"][-1] + 1, (2, 12))
    engine.base_model.eval()
    with torch.no_grad():
        ours = engine.base_model(x)
        reloaded = lmstack.load_model(base_dir, adapter=adapter).eval()
        torch.testing.assert_close(reloaded(x), ours, atol=1e-5, rtol=1e-5)
        hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
        hf.resize_token_embeddings(len(transformers.AutoTokenizer.from_pretrained(adapter)))  # peft's documented flow
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(hf, adapter).eval()
        torch.testing.assert_close(theirs(x).logits, ours, atol=1e-5, rtol=1e-5)


def test_new_tokens_on_an_untied_head_and_merge_cli(untied_base_dir, tmp_path, capsys, monkeypatch):
    cfg = config(untied_base_dir, write_data(tmp_path / "d.jsonl"), tmp_path / "run")
    result = build_engine(cfg).fit()
    out = tmp_path / "merged"
    assert cli(["merge", "--model", str(untied_base_dir), "--adapter", str(result.checkpoint), "--out", str(out)]) == 0
    x = torch.randint(0, 40, (1, 10))
    with torch.no_grad():
        adapted = lmstack.load_model(untied_base_dir, adapter=result.checkpoint).eval()(x)
        merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(x).logits
        hf = transformers.AutoModelForCausalLM.from_pretrained(untied_base_dir)
        hf.resize_token_embeddings(adapted.shape[-1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(hf, result.checkpoint).eval()(x).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, adapted, atol=1e-5, rtol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|im_end|>") is not None
    # generate and chat take the adapter (and its tokenizer, which has the chat markers the base lacks)
    assert cli(["generate", "--model", str(untied_base_dir), "--adapter", str(result.checkpoint), "--chat",
                "--prompt", "What is 2 + 2?", "--max-new-tokens", "4", "--jsonl"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["finish_reason"] in ("length", "stop")
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 1 + 1?\n"))
    assert cli(["chat", "--model", str(untied_base_dir), "--adapter", str(result.checkpoint),
                "--max-new-tokens", "3"]) == 0


def test_full_finetune_writes_a_transformers_directory_and_loss_falls(base_dir, tmp_path):
    cfg = config(base_dir, write_data(tmp_path / "d.jsonl"), tmp_path / "run", method="full",
                 **{"train.steps": 12, "optim.lr": 3e-3})
    result = build_engine(cfg).fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("kind") == "train"]
    assert losses[-1] < losses[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(result.checkpoint)
    assert hf.config.vocab_size == lmstack.load_model(result.checkpoint).config.vocab_size


def test_resume_continues_exactly(base_dir, tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    constant = {"train.steps": 4, "schedule.kind": "constant", "lora.lora_dropout": 0.1}  # dropout: its RNG resumes too
    straight = build_engine(config(base_dir, data, tmp_path / "a", **constant)).fit()
    first = config(base_dir, data, tmp_path / "b", **constant, **{"train.checkpoint_every": 2})
    engine = build_engine(copy.deepcopy(first))
    engine.cfg.steps = 2  # stop half-way, as a killed run would (a constant schedule: the same learning rates)
    engine.fit()
    resumed = build_engine(first, resume=True).fit()
    a = json.loads((straight.checkpoint / "adapter_config.json").read_text())
    assert a == json.loads((resumed.checkpoint / "adapter_config.json").read_text())
    from safetensors.torch import load_file
    x, y = load_file(straight.checkpoint / "adapter_model.safetensors"), load_file(resumed.checkpoint / "adapter_model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_bad_configs_and_adapters_give_clear_errors(base_dir, untied_base_dir, tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    with pytest.raises(ConfigError, match="matches no linear layer.*q_proj"):
        build_engine(config(base_dir, data, tmp_path / "r1", **{"lora.target_modules": "[qkv]"}))
    with pytest.raises(ConfigError, match="has no chat_template"):
        build_engine(load_config(FinetuneConfig, None, [f"--model={base_dir}", f"--data.train={data}",
                                                        f"--out_dir={tmp_path / 'r2'}"]))
    # an adapter trained on one base, loaded on a base of another width
    result = build_engine(config(base_dir, data, tmp_path / "r3", **{"train.steps": 1})).fit()
    other = tmp_path / "wide"
    torch.manual_seed(0)
    wide = lmstack.Transformer(lmstack.load_model(base_dir).config.replace(hidden_size=48, intermediate_size=96))
    lmstack.save_model(wide, other)
    with pytest.raises(CheckpointError, match=r"tensor base_model\.model\.model\.layers\.0\..*lora_A\.weight has shape"):
        lmstack.load_model(other, adapter=result.checkpoint)


def test_qlora_run_keeps_the_base_in_nf4_and_writes_a_peft_adapter(base_dir, tmp_path):
    from lmstack.adapters.qlora import NF4Linear
    engine = build_engine(config(base_dir, write_data(tmp_path / "d.jsonl"), tmp_path / "run", method="qlora"))
    assert sum(isinstance(m, NF4Linear) for m in engine.base_model.modules()) == 14
    result = engine.fit()
    written = json.loads((result.checkpoint / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["target_modules"]
    x = torch.randint(0, 40, (1, 10))
    with torch.no_grad():  # on the fp32 base the adapter gives nearly the NF4-trained model's outputs
        fp32 = lmstack.load_model(base_dir, adapter=result.checkpoint).eval()(x)
        nf4 = engine.base_model.eval()(x)
    assert (fp32 - nf4).abs().max() < 0.1
