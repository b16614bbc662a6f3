"""Chat templates against transformers' apply_chat_template, and the assistant-token mask for SFT."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmstack.tokenizer import Tokenizer, TokenizerError, load_tokenizer, train_tokenizer
from lmstack.tokenizer.chat_template import CHATML, LLAMA3, ChatTemplateError, render_with_assistant_spans

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "  Padded system prompt.  "}, {"role": "user", "content": "Translate: café"},
     {"role": "assistant", "content": "Kaffee 🙂 — naïve? 東京!"}, {"role": "user", "content": "Again"},
     {"role": "assistant", "content": "Line one\nLine two\n"}],
]
END_MARKER = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


KINDS_AND_TEMPLATES = [("bpe", "chatml"), ("bpe", "llama3"), ("unigram", "chatml"), ("char", "llama3")]


@pytest.fixture(scope="module", params=KINDS_AND_TEMPLATES, ids=lambda p: "-".join(p))
def chat_tokenizer(request, shared_data: Path, tmp_path_factory) -> tuple[str, Tokenizer, Path]:
    """(template name, tokenizer, saved directory); byte-level, Metaspace and per-character offsets all differ."""
    kind, template = request.param
    book = shared_data / "gutenberg_nltk" / "blake-poems.txt"
    tokenizer = train_tokenizer([book], kind, None if kind == "char" else 600, chat_template=template)
    directory = tmp_path_factory.mktemp(f"chat-{kind}-{template}")
    tokenizer.save(directory)
    return template, tokenizer, directory


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_rendering_equals_transformers(chat_tokenizer, conversation, add_generation_prompt):
    _, tokenizer, directory = chat_tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    messages = CONVERSATIONS[conversation]
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_assistant_mask_equals_transformers_and_covers_exactly_the_replies(chat_tokenizer, conversation):
    name, tokenizer, directory = chat_tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    messages = CONVERSATIONS[conversation]
    ids, mask = tokenizer.render_chat(messages)
    reference = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == reference["input_ids"]
    assert mask == reference["assistant_masks"]
    content = lambda m: m["content"].strip() if name == "llama3" else m["content"]  # noqa: E731 (llama3 trims)
    expected = "".join(content(m) + END_MARKER[name] for m in messages if m["role"] == "assistant")
    if tokenizer.model_type != "BPE":  # not byte-level: characters these tiny vocabularies lack decode as unk
        expected = tokenizer.decode(tokenizer.encode(expected))
    assert tokenizer.decode([i for i, keep in zip(ids, mask, strict=True) if keep]) == expected
    assert tokenizer.decode(ids) == hf.decode(ids)
    if tokenizer.model_type == "BPE":
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages)


def test_prefix_fallback_finds_the_same_spans_as_generation_tags():
    """A template without {% generation %} (as most third-party ones) gets its spans by prefix differencing."""
    plain = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    for messages in CONVERSATIONS:
        tagged_text, tagged_spans = render_with_assistant_spans(CHATML, messages)
        plain_text, plain_spans = render_with_assistant_spans(plain, messages)
        assert plain_text == tagged_text and plain_spans == tagged_spans


def test_llama3_template_starts_with_bos_and_stops_at_eot():
    tokenizer = train_tokenizer(iter(["Hi there"]), "char", None, chat_template="llama3")
    text = tokenizer.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True)
    assert text == ("<|bos|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    for marker in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert marker in tokenizer.special_tokens.extra


def test_template_from_a_transformers_saved_directory(chat_tokenizer, tmp_path):
    """transformers >= 4.43 saves the template as chat_template.jinja; loading must find it there."""
    _, tokenizer, directory = chat_tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    hf.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.special_tokens == tokenizer.special_tokens  # v5 writes the extras as extra_special_tokens
    assert loaded.chat_template is not None
    assert loaded.apply_chat_template(CONVERSATIONS[2]) == tokenizer.apply_chat_template(CONVERSATIONS[2])
    assert loaded.encode(CONVERSATIONS[2][2]["content"]) == tokenizer.encode(CONVERSATIONS[2][2]["content"])


def test_raise_exception_tojson_and_special_token_variables_match_transformers(chat_tokenizer, tmp_path):
    _, tokenizer, _ = chat_tokenizer
    tokenizer = Tokenizer(tokenizer.backend, tokenizer.special_tokens, chat_template=(
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}"
        "{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ messages | tojson }}"))
    tokenizer.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = CONVERSATIONS[2]
    assert tokenizer.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False)
    assert "Kaffee 🙂" in tokenizer.apply_chat_template(messages)  # tojson keeps non-ASCII, like transformers
    with pytest.raises(ChatTemplateError, match="first message must be system"):
        tokenizer.apply_chat_template(CONVERSATIONS[0])


def test_extra_template_variables_reach_the_template_as_in_transformers(chat_tokenizer):
    _, tokenizer, directory = chat_tokenizer
    template = "{{ bos_token }}{% for t in tools %}[{{ t.name }}]{% endfor %}{{ messages[0].content }} {{ today }}"
    custom = Tokenizer(tokenizer.backend, tokenizer.special_tokens, chat_template=template)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    variables = {"tools": [{"name": "search"}, {"name": "calc"}], "today": "2026-11-23", "bos_token": "<B>"}
    ours = custom.apply_chat_template(CONVERSATIONS[0], **variables)
    assert ours == hf.apply_chat_template(CONVERSATIONS[0], tokenize=False, chat_template=template, **variables)
    assert ours == "<B>[search][calc]Hi there 2026-11-23"


def test_bad_templates_and_messages_give_clear_errors():
    tokenizer = train_tokenizer(iter(["hello world"]), "char", None)
    with pytest.raises(TokenizerError, match="no chat_template"):
        tokenizer.apply_chat_template(CONVERSATIONS[0])
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }"
    with pytest.raises(ChatTemplateError, match="chat template line 1"):
        tokenizer.apply_chat_template(CONVERSATIONS[0])
    tokenizer.chat_template = LLAMA3
    with pytest.raises(ChatTemplateError, match=r"messages\[1\] must be a dict with 'role' and 'content'"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"text": "y"}])
    tokenizer.chat_template = CHATML  # concatenates content: None cannot be added to a str
    with pytest.raises(ChatTemplateError, match="chat template failed on these messages: TypeError"):
        tokenizer.apply_chat_template([{"role": "user", "content": None}])
    with pytest.raises(ChatTemplateError, match="not a built-in"):
        train_tokenizer(iter(["hello"]), "char", None, chat_template="no-such-template.jinja")
