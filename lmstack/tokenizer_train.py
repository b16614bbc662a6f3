"""Build and train the `tokenizers` pipeline for each kind (used by lmstack.tokenizer.train_tokenizer).

Each kind is a full tokenizers pipeline (normaliser, pre-tokeniser, model, post-processor, decoder), so
the saved tokenizer.json is self-describing and any `tokenizers`/transformers user gets the same ids:

  bpe        byte-level BPE (GPT-2 style regex split, ByteLevel alphabet of all 256 bytes always in the
             vocabulary, so no text is ever unknown); add_special_tokens prepends bos.
  wordpiece  BERT: BertNormalizer (clean text, CJK split, lowercase), BertPreTokenizer, '##' continuation,
             [UNK] for words it cannot spell; add_special_tokens gives [CLS] A [SEP] (pairs: [CLS] A [SEP] B [SEP]).
  unigram    SentencePiece-style: NFKC, Metaspace ('▁' marks a word start), unigram LM pruning; bos prepended.
  char       one token per character: WordLevel over the corpus's characters with a per-character Split
             pre-tokeniser and a Fuse decoder; unseen characters map to unk.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmstack import tokenizer as _tok

BYTE_ALPHABET_SIZE = 256
_READ_CHUNK = 1 << 20  # about this many characters per block of a training file


def train_backend(source: list[str] | Iterator[str], kind: str, vocab_size: int | None, min_frequency: int,
                  special: _tok.SpecialTokens, show_progress: bool) -> tokenizers.Tokenizer:
    """Train the backend tokenizer for `kind` on files (list of paths) or an iterator of texts."""
    specials = special.all()
    if min_frequency < 1:
        raise _tok.TokenizerError(f"min_frequency must be >= 1, got {min_frequency}")
    if kind != "char" and vocab_size is None:
        raise _tok.TokenizerError(f"{kind} needs a vocab size")
    if vocab_size is not None and vocab_size <= len(specials):
        raise _tok.TokenizerError(f"vocab size {vocab_size} leaves no room beside the {len(specials)} special tokens")
    if kind == "bpe":
        need = BYTE_ALPHABET_SIZE + len(specials)
        if vocab_size < need:
            raise _tok.TokenizerError(
                f"vocab size {vocab_size} is too small for byte-level BPE: the 256-byte alphabet plus "
                f"{len(specials)} special tokens need at least {need}")
        backend = tokenizers.Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=show_progress)
        _train(backend, trainer, source)
        backend.post_processor = _post_processor(backend, special, byte_level=True)
        return backend
    if kind == "wordpiece":
        if special.unk is None:
            raise _tok.TokenizerError("wordpiece needs an unk token (a word it cannot spell becomes unk)")
        unk = special.unk
        backend = tokenizers.Tokenizer(models.WordPiece(unk_token=unk, continuing_subword_prefix="##"))
        backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                        strip_accents=None, lowercase=True)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=specials, continuing_subword_prefix="##",
                                            show_progress=show_progress)
        _train(backend, trainer, source)
        backend.post_processor = _post_processor(backend, special, byte_level=False)
        return backend
    if kind == "unigram":
        if special.unk is None:
            raise _tok.TokenizerError("unigram needs an unk token (characters outside its alphabet become unk)")
        backend = tokenizers.Tokenizer(models.Unigram())
        backend.normalizer = normalizers.NFKC()
        # "first": only the start of the text gets a '▁', not every piece after a special token, so a
        # rendered chat ("<|im_start|>user\n...") decodes back without spaces the template never wrote.
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=special.unk,
                                          max_piece_length=16, show_progress=show_progress)
        _train(backend, trainer, source)
        backend.post_processor = _post_processor(backend, special, byte_level=False)
        return backend
    if kind == "char":
        return _train_char(source, vocab_size, min_frequency, special)
    raise _tok.TokenizerError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(_tok.KINDS)}")


def _train(backend: tokenizers.Tokenizer, trainer: trainers.Trainer, source: list[str] | Iterator[str]) -> None:
    backend.train_from_iterator(_iter_texts(source), trainer)
    if backend.get_vocab_size() == len(trainer.special_tokens):
        raise _tok.TokenizerError("the training text is empty: no tokens were learned")


def _post_processor(backend: tokenizers.Tokenizer, special: _tok.SpecialTokens,
                    byte_level: bool) -> processors.PostProcessor | None:
    """What add_special_tokens=True adds: [CLS] A [SEP] when cls/sep are set (BERT), else bos A."""
    if special.cls is not None and special.sep is not None:
        cls_, sep = special.cls, special.sep
        template = processors.TemplateProcessing(
            single=f"{cls_} $A {sep}", pair=f"{cls_} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls_, backend.token_to_id(cls_)), (sep, backend.token_to_id(sep))])
    elif special.bos is not None:
        bos = special.bos
        template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B:1",
                                                 special_tokens=[(bos, backend.token_to_id(bos))])
    else:
        template = None
    if not byte_level:
        return template
    # ByteLevel's processor keeps offsets pointing at the text (trim_offsets=False: the leading space
    # stays part of the token, as in the vocabulary); the template then adds bos.
    byte_processor = processors.ByteLevel(trim_offsets=False)
    return byte_processor if template is None else processors.Sequence([byte_processor, template])


def _iter_texts(source: list[str] | Iterator[str]) -> Iterator[str]:
    if not isinstance(source, list):
        yield from source
        return
    # Files are read here rather than by the Rust trainer, which aborts on the first invalid UTF-8 byte
    # (real corpora have them, e.g. Latin-1 leftovers); those become U+FFFD. Blocks end at line ends so
    # no word is cut in two.
    for path in source:
        with open(path, encoding="utf-8", errors="replace") as f:
            while lines := f.readlines(_READ_CHUNK):
                yield "".join(lines)


def _train_char(source: list[str] | Iterator[str], vocab_size: int | None, min_frequency: int,
                special: _tok.SpecialTokens) -> tokenizers.Tokenizer:
    if special.unk is None:
        raise _tok.TokenizerError("char needs an unk token (characters not seen in training become unk)")
    counts: Counter[str] = Counter()
    for text in _iter_texts(source):
        counts.update(text)
    if not counts:
        raise _tok.TokenizerError("the training text is empty: no characters were seen")
    specials = special.all()
    # most frequent first, ties in code-point order, so the vocabulary is deterministic
    chars = [c for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_frequency
             and c not in specials]
    if vocab_size is not None:
        chars = chars[: vocab_size - len(specials)]
    vocab = {token: i for i, token in enumerate([*specials, *chars])}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=special.unk))
    # [\s\S] matches every character, newline included; "isolated" makes each its own pre-token
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    backend.post_processor = _post_processor(backend, special, byte_level=False)
    return backend
