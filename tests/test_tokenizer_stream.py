"""StreamDecoder: the concatenated stream equals a one-shot decode and never carries half a character."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmstack.tokenizer import KINDS, StreamDecoder, Tokenizer, train_tokenizer

# Multi-byte text: 2-byte (accents), 3-byte (CJK, em dash), 4-byte (emoji, with a skin-tone modifier).
TEXTS = [
    "Grüße aus Zürich — naïve café, señor!",
    "東京タワーは高い。日本語のテキスト。",
    "Party 🎉🙂👍🏽 time; family 👨‍👩‍👧 emoji",
    "Mixed: ASCII, ü, 中, 🙂 and back to ASCII.",
]


@pytest.fixture(scope="module")
def tokenizers_by_kind(shared_data: Path) -> dict[str, Tokenizer]:
    book = shared_data / "gutenberg_nltk" / "blake-poems.txt"
    return {kind: train_tokenizer([book], kind, {"bpe": 500, "wordpiece": 500, "unigram": 300, "char": None}[kind])
            for kind in KINDS}


def stream(decoder: StreamDecoder, ids: list[int]) -> list[str]:
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_stream_never_splits_a_character(tokenizers_by_kind, text):
    tokenizer = tokenizers_by_kind["bpe"]
    ids = tokenizer.encode(text)
    # the tokenizer was trained on English verse, so these characters are spelled in single bytes:
    # many ids are a fragment of a character, which is the case under test
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    chunks = stream(StreamDecoder(tokenizer), ids)
    assert "".join(chunks) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert "" in chunks[:-1]  # something was held back until its character was complete


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_streams_what_one_shot_decode_gives(tokenizers_by_kind, kind):
    """Context-dependent decoders (Metaspace spaces, WordPiece '##' joins) stream correctly too."""
    tokenizer = tokenizers_by_kind[kind]
    for text in [*TEXTS, "The tyger burning bright in the forests of the night"]:
        ids = tokenizer.encode(text)
        assert "".join(stream(StreamDecoder(tokenizer), ids)) == tokenizer.decode(ids, skip_special_tokens=True)


def test_prompt_context_gives_the_continuation_only(tokenizers_by_kind):
    for kind in ("bpe", "unigram", "wordpiece"):
        tokenizer = tokenizers_by_kind[kind]
        prompt = tokenizer.encode("The tyger burning")
        generated = tokenizer.encode(" bright 🙂 in the forests")
        full, head = (tokenizer.decode(ids, skip_special_tokens=True) for ids in (prompt + generated, prompt))
        expected = full[len(head):]
        assert "".join(stream(StreamDecoder(tokenizer, prompt_ids=prompt), generated)) == expected, kind


def test_special_tokens_are_skipped_or_kept(tokenizers_by_kind):
    tokenizer = tokenizers_by_kind["bpe"]
    ids = tokenizer.encode("hello") + [tokenizer.eos_token_id]
    assert "".join(stream(StreamDecoder(tokenizer), ids)) == "hello"
    assert "".join(stream(StreamDecoder(tokenizer, skip_special_tokens=False), ids)) == "hello<|eos|>"


def test_flush_releases_an_incomplete_character_as_replacement(tokenizers_by_kind):
    tokenizer = tokenizers_by_kind["bpe"]
    ids = tokenizer.encode("ok 🙂")
    decoder = StreamDecoder(tokenizer)
    pushed = "".join(decoder.push(i) for i in ids[:-1])  # the emoji's last byte never arrives
    assert pushed == "ok " and decoder.flush() == "\ufffd"
