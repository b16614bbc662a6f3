"""Text prompts are encoded as transformers encodes them: `tok(text)` with the tokenizer's special tokens
(BOS for a Llama-style tokenizer), a rendered chat without them (the template writes its own BOS). Checked
against transformers' tokenizer and generate on a tiny random Llama built locally."""

from __future__ import annotations

import json

import torch

import lmstack
from lmstack.cli import main

NEW = 12


def hf_greedy(reference, ids: list[int], eos: int) -> list[int]:
    """transformers' greedy continuation of `ids`, cut after the first EOS."""
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    return new[:new.index(eos) + 1] if eos in new else new


def test_text_prompt_greedy_equals_transformers_tok_plus_generate(bos_llama):
    reference, hf_tok, model, tok = bos_llama
    texts = ["The quick brown fox", "def main():"]
    out = lmstack.generate(model, tok, texts, max_new_tokens=NEW)
    for text, got in zip(texts, out.token_ids):
        ids = hf_tok(text)["input_ids"]
        assert ids[0] == hf_tok.bos_token_id  # a Llama-style tokenizer: BOS first
        assert got == hf_greedy(reference, ids, hf_tok.eos_token_id)
    # leaving the special tokens out is an option, and it matters here
    bare = lmstack.generate(model, tok, texts[0], max_new_tokens=NEW, add_special_tokens=False)
    bare_ids = hf_tok(texts[0], add_special_tokens=False)["input_ids"]
    assert bare.token_ids[0] == hf_greedy(reference, bare_ids, hf_tok.eos_token_id) != out.token_ids[0]
    # stream encodes the same way
    from lmstack.generate import stream

    assert "".join(stream(model, tok, texts[0], max_new_tokens=NEW)) == out.texts[0]


def test_empty_text_prompt_starts_from_bos(bos_llama):
    reference, hf_tok, model, tok = bos_llama
    assert hf_tok("")["input_ids"] == [hf_tok.bos_token_id]
    out = lmstack.generate(model, tok, "", max_new_tokens=NEW)
    assert out.token_ids[0] == hf_greedy(reference, [hf_tok.bos_token_id], hf_tok.eos_token_id)


def test_cli_prompt_and_chat_encode_as_transformers(bos_llama_dir, bos_llama, capsys):
    reference, hf_tok, _, _ = bos_llama
    eos = hf_tok.eos_token_id
    assert main(["generate", "--model", str(bos_llama_dir), "--prompt", "The quick brown fox", "--jsonl",
                 "--max-new-tokens", str(NEW)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["token_ids"] == hf_greedy(reference, hf_tok("The quick brown fox")["input_ids"], eos)
    # --chat renders the Llama 3 template, which writes BOS: encoded without special tokens, so one BOS
    assert main(["generate", "--model", str(bos_llama_dir), "--prompt", "hi", "--chat", "--jsonl",
                 "--max-new-tokens", str(NEW)]) == 0
    record = json.loads(capsys.readouterr().out)
    chat_ids = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]
    assert chat_ids.count(hf_tok.bos_token_id) == 1
    assert record["token_ids"] == hf_greedy(reference, chat_ids, eos)
    # --no-special-tokens leaves BOS out of a plain prompt
    assert main(["generate", "--model", str(bos_llama_dir), "--prompt", "The quick brown fox", "--jsonl",
                 "--no-special-tokens", "--max-new-tokens", str(NEW)]) == 0
    record = json.loads(capsys.readouterr().out)
    bare_ids = hf_tok("The quick brown fox", add_special_tokens=False)["input_ids"]
    assert record["token_ids"] == hf_greedy(reference, bare_ids, eos)
