"""Train a tokenizer: `train_tokenizer`, and the `tokenizers` pipeline it builds for each kind.

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

import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmstack.errors import TokenizerError
from lmstack.tokenizer import chat_template as templates
from lmstack.tokenizer.special import CHATML_MARKERS, KINDS, Kind, SpecialTokens
from lmstack.tokenizer.tokenizer import Tokenizer


def train_tokenizer(files_or_iterator: Sequence[str | os.PathLike[str]] | Iterator[str] | Iterable[str],
                    kind: Kind, vocab_size: int | None, min_frequency: int | None = None,
                    special_tokens: SpecialTokens | None = None,
                    chat_template: str | None = "default", show_progress: bool = False) -> Tokenizer:
    """Train a tokenizer of `kind` on text.

    files_or_iterator: a list/tuple of text file paths (read by the Rust trainer), or any other iterable
        (e.g. a generator) of text strings.
    vocab_size: target vocabulary including special tokens (bpe needs >= 256 + specials). For `char`, None
        keeps every distinct character; a number keeps the most frequent ones (the rest map to unk).
    min_frequency: bpe/wordpiece merge threshold (default 2); char: drop characters seen fewer times
        (default 1, i.e. keep all); unigram has no such threshold and rejects a value other than None/1.
    special_tokens: defaults to SpecialTokens.default(kind).
    chat_template: "default" (ChatML for bpe/unigram, none for wordpiece/char), "chatml", "llama3", a file
        path, raw Jinja source (containing '{%' or '{{'), or None. The markers a built-in template needs
        are added to the special tokens.
    """
    if kind not in KINDS:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")
    special = special_tokens if special_tokens is not None else SpecialTokens.default(kind)
    source: str | None
    if chat_template == "default":
        source = templates.CHATML if kind in ("bpe", "unigram") else None
        if source is not None:
            special = special.with_extra(CHATML_MARKERS)
    elif chat_template is None:
        source = None
    elif chat_template in templates.BUILTIN_TEMPLATES:
        source = templates.BUILTIN_TEMPLATES[chat_template]
        special = special.with_extra(templates.TEMPLATE_SPECIAL_TOKENS[chat_template])
    elif "{%" in chat_template or "{{" in chat_template:
        source = chat_template
    else:
        source = templates.resolve_template(chat_template)
    if kind == "unigram" and min_frequency not in (None, 1):
        raise TokenizerError("min_frequency does not apply to unigram (its trainer prunes by likelihood)")
    backend = train_backend(_training_source(files_or_iterator), kind, vocab_size,
                            min_frequency if min_frequency is not None else (1 if kind == "char" else 2),
                            special, show_progress)
    # Continue from the serialised form, so the returned tokenizer is exactly what a reload of it gives.
    # transformers must not "clean up" decoded text (" ." -> "."): decode has to round-trip, as ours does.
    return Tokenizer(tokenizers.Tokenizer.from_str(backend.to_str()), special, source,
                     config={"clean_up_tokenization_spaces": False})


def _training_source(files_or_iterator: Any) -> list[str] | Iterator[str]:
    if isinstance(files_or_iterator, (str, os.PathLike)):
        files_or_iterator = [files_or_iterator]
    if isinstance(files_or_iterator, (list, tuple)):
        paths = [os.fspath(p) for p in files_or_iterator]
        if not paths:
            raise TokenizerError("no training files given")
        for p in paths:
            if not os.path.isfile(p):
                raise TokenizerError(f"{p}: no such training file (pass an iterator to train on in-memory text)")
        return paths
    return iter(files_or_iterator)


BYTE_ALPHABET_SIZE = 256
_READ_CHUNK = 1 << 20  # about this many characters per block of a training file


def train_backend(source: list[str] | Iterator[str], kind: str, vocab_size: int | None, min_frequency: int,
                  special: SpecialTokens, show_progress: bool) -> tokenizers.Tokenizer:
    """Train the backend tokenizer for `kind` on files (list of paths) or an iterator of texts."""
    specials = special.all()
    if min_frequency < 1:
        raise TokenizerError(f"min_frequency must be >= 1, got {min_frequency}")
    if kind != "char" and vocab_size is None:
        raise TokenizerError(f"{kind} needs a vocab size")
    if vocab_size is not None and vocab_size <= len(specials):
        raise TokenizerError(f"vocab size {vocab_size} leaves no room beside the {len(specials)} special tokens")
    if kind == "bpe":
        need = BYTE_ALPHABET_SIZE + len(specials)
        if vocab_size < need:
            raise TokenizerError(
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
            raise TokenizerError("wordpiece needs an unk token (a word it cannot spell becomes unk)")
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
            raise TokenizerError("unigram needs an unk token (characters outside its alphabet become unk)")
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
    raise TokenizerError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")


def _train(backend: tokenizers.Tokenizer, trainer: trainers.Trainer, source: list[str] | Iterator[str]) -> None:
    backend.train_from_iterator(_iter_texts(source), trainer)
    if backend.get_vocab_size() == len(trainer.special_tokens):
        raise TokenizerError("the training text is empty: no tokens were learned")


def _post_processor(backend: tokenizers.Tokenizer, special: SpecialTokens,
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
                special: SpecialTokens) -> tokenizers.Tokenizer:
    if special.unk is None:
        raise TokenizerError("char needs an unk token (characters not seen in training become unk)")
    counts: Counter[str] = Counter()
    for text in _iter_texts(source):
        counts.update(text)
    if not counts:
        raise TokenizerError("the training text is empty: no characters were seen")
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
