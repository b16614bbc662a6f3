"""`lmstack tokenizer`: train a tokenizer on files or a built-in corpus, and inspect one (encode, decode, info).

    lmstack tokenizer train --kind bpe --vocab-size 8192 --input DATA_DIR notes.jsonl --out tok/
    lmstack tokenizer train --kind char --input input.txt --out tok-char/
    lmstack tokenizer train --corpus builtin:python-docs --vocab-size 8192 --out tok/
    lmstack tokenizer encode --tokenizer tok/ "Hello world"
    lmstack tokenizer decode --tokenizer tok/ 300 301
    lmstack tokenizer info tok/

Training inputs are read by the data pipeline's readers (lmstack.data.ingest): text/markdown files,
directories (recursive), globs, JSONL (`--text-field`), Parquet, gzip of these. The options form a
typed `TokenizerTrainConfig`; `--config FILE.yaml` supplies its fields (`inputs`, `vocab_size`, `output`,
...: `--print-config` shows them all), and flags override it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from lmstack.cli.args import PRINT_CONFIG_HELP, add_out, integer, positive_int, print_config, read_stdin, text_arg
from lmstack.schema import from_sources, load_yaml
from lmstack.tokenizer import KINDS, ROLES, SpecialTokens, Tokenizer, TokenizerError, load_tokenizer, train_tokenizer


@dataclass
class TokenizerTrainConfig:
    """Everything `lmstack tokenizer train` needs; the YAML keys are these field names."""

    output: str
    kind: Literal["bpe", "wordpiece", "unigram", "char"] = "bpe"
    vocab_size: int | None = None  # None: 8192, or for char every distinct character
    min_frequency: int | None = None  # None: 2 for bpe/wordpiece, 1 for char; unigram has none
    inputs: list[str] = field(default_factory=list)  # files, directories (recursive), globs
    corpus: str | None = None  # e.g. "builtin:python-docs"
    text_field: str = "text"  # JSONL key / Parquet column holding the text
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    strict: bool = False  # a malformed JSONL line is an error instead of skipped and counted
    special_tokens: list[str] = field(default_factory=list)  # ROLE=TOKEN (ROLE= removes) or an extra TOKEN
    chat_template: str = "default"  # default | chatml | llama3 | none | PATH to a Jinja file

    def __post_init__(self) -> None:
        if not self.inputs and not self.corpus:
            raise TokenizerError("no training text: give --input FILES_OR_DIRS and/or --corpus builtin:NAME")


def parse_special_tokens(items: list[str], kind: str) -> SpecialTokens:
    """Start from the kind's defaults; `bos=<s>` sets a role, `pad=` removes one, a bare token is added as extra."""
    special = SpecialTokens.default(kind)
    roles = special.roles()
    roles = {r: roles.get(r) for r in ROLES}
    extra = list(special.extra)
    for item in items:
        role, sep, token = item.partition("=")
        if sep and role in ROLES:
            roles[role] = token or None
        elif sep and role.isidentifier():
            raise TokenizerError(f"--special-tokens {item!r}: unknown role {role!r} (roles: {', '.join(ROLES)})")
        elif item and item not in extra:
            extra.append(item)
    return SpecialTokens(**roles, extra=tuple(extra))


def _texts(config: TokenizerTrainConfig, counters: dict[str, int]) -> Iterator[str]:
    # Imported here so `lmstack tokenizer encode` does not load the data pipeline.
    from lmstack.data.ingest import IngestStats, expand_inputs, read_documents

    stats = IngestStats()
    if config.inputs:
        files = expand_inputs(config.inputs)
        for doc in read_documents(files, stats, fmt=config.format, text_field=config.text_field,
                                  strict=config.strict):
            counters["characters"] += len(doc.text)
            yield doc.text
    if config.corpus:
        from lmstack.data.builtin import read_builtin

        for doc in read_builtin(config.corpus, stats):
            counters["characters"] += len(doc.text)
            yield doc.text
    counters["documents"] = stats.documents
    counters["skipped"] = stats.malformed_lines + stats.missing_field + stats.non_string_field
    counters["missing_field"] = stats.missing_field + stats.non_string_field


def train_from_config(config: TokenizerTrainConfig) -> Tokenizer:
    """Train per `config`, save to `config.output`, print a one-line summary; returns the tokenizer."""
    special = parse_special_tokens(config.special_tokens, config.kind)
    template: str | None = None if config.chat_template == "none" else config.chat_template
    counters = {"characters": 0, "documents": 0, "skipped": 0}
    start = time.perf_counter()
    vocab_size = config.vocab_size if config.vocab_size is not None else (None if config.kind == "char" else 8192)
    tokenizer = train_tokenizer(_texts(config, counters), config.kind, vocab_size,
                                min_frequency=config.min_frequency, special_tokens=special, chat_template=template,
                                show_progress=sys.stderr.isatty())  # the trainers' own progress bars, on a terminal
    seconds = time.perf_counter() - start
    if counters["characters"] == 0:
        raise TokenizerError(_no_text(config, counters))
    tokenizer.save(config.output)
    print(f"trained {config.kind} tokenizer: vocab {tokenizer.vocab_size} ({len(tokenizer.special_tokens.all())} "
          f"special), {counters['documents']:,} documents, {counters['characters']:,} characters "
          f"({counters['skipped']} records skipped) in {seconds:.1f}s -> {config.output}")
    return tokenizer


def _no_text(config: TokenizerTrainConfig, counters: dict[str, int]) -> str:
    source = " ".join(config.inputs) or config.corpus
    if counters["missing_field"]:
        return (f"no training text: {counters['missing_field']} records of {source} have no string field "
                f"{config.text_field!r}; set --text-field to the JSONL key (or Parquet column) holding the text")
    if counters["skipped"]:
        return f"no training text: all {counters['skipped']} records of {source} were malformed and skipped"
    return f"no training text: {source} holds {counters['documents']} documents, all empty; nothing was written"


# TokenizerTrainConfig field -> how the command line spells it (for error messages)
_FLAG_NAMES = {"inputs": "--input", "output": "--out"}


def _train_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmstack tokenizer train", description="Train a tokenizer and save it "
                                     "as a Hugging Face tokenizer directory.", argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file with TokenizerTrainConfig fields (inputs, vocab_size, output, "
                        "...); flags override it")
    parser.add_argument("--kind", choices=KINDS, help="tokenizer model (default bpe)")
    parser.add_argument("--vocab-size", type=positive_int, help="vocabulary size including special tokens (default "
                        "8192; char: all characters unless given)")
    parser.add_argument("--input", dest="inputs", nargs="+", help="text/markdown/JSONL/Parquet files (or .gz), "
                        "directories (recursive) or globs")
    parser.add_argument("--corpus", help="a built-in corpus, e.g. builtin:python-docs")
    add_out(parser, "--output", dest="output", help="directory to write tokenizer.json, tokenizer_config.json, ...")
    parser.add_argument("--min-frequency", type=positive_int, help="minimum count of a merge/character (bpe, "
                        "wordpiece default 2; char default 1)")
    parser.add_argument("--special-tokens", nargs="+", help="ROLE=TOKEN to set a role (bos, eos, pad, unk, cls, "
                        "sep, mask), ROLE= to drop it, or TOKEN to add an extra special token")
    parser.add_argument("--chat-template", metavar="{default,chatml,llama3,none,PATH}",
                        help="built-in template name, none, or a Jinja file (default: chatml for bpe/unigram)")
    parser.add_argument("--text-field", help="JSONL key / Parquet column with the text (default text)")
    parser.add_argument("--format", choices=["auto", "text", "jsonl", "parquet"],
                        help="input format (default auto: by file suffix)")
    parser.add_argument("--strict", action="store_true", help="fail on a malformed JSONL line instead of "
                        "skipping it")
    parser.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    args = vars(parser.parse_args(argv))
    show = args.pop("print_config", False)
    path = args.pop("config", None)
    file_data = load_yaml(path) if path is not None else {}
    data = {**file_data, **args}
    if "output" not in data:
        parser.error("--out is required")
    flags = {key: _FLAG_NAMES.get(key, "--" + key.replace("_", "-")) for key in args}
    config = from_sources(TokenizerTrainConfig, data, path=path, file_data=file_data, flags=flags)
    if show:
        return print_config(config)
    train_from_config(config)
    return 0


def _encode_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmstack tokenizer encode", description="Print the ids and pieces of text.")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory")
    parser.add_argument("text", nargs="+", help="text to encode ('-' reads standard input)")
    parser.add_argument("--special", action="store_true", help="add special tokens (bos / [CLS] ... [SEP])")
    parser.add_argument("--json", action="store_true", help="print one JSON object per text")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    for i, text in enumerate(args.text, 1):
        text = read_stdin() if text == "-" else text_arg(text, f"text argument {i}")
        encoding = tokenizer.backend.encode(text, add_special_tokens=args.special)
        if args.json:
            print(json.dumps({"ids": encoding.ids, "tokens": encoding.tokens}, ensure_ascii=False))
            continue
        print(f"{len(encoding.ids)} tokens, {len(text)} characters")
        print("ids:   ", " ".join(map(str, encoding.ids)))
        print("pieces:", " ".join(json.dumps(t, ensure_ascii=False) for t in encoding.tokens))
    return 0


def _decode_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmstack tokenizer decode", description="Print the text of token ids.")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory")
    parser.add_argument("ids", nargs="+", type=integer, help="token ids")
    parser.add_argument("--skip-special", action="store_true", help="drop special tokens from the text")
    args = parser.parse_args(argv)
    print(load_tokenizer(args.tokenizer).decode(args.ids, skip_special_tokens=args.skip_special))
    return 0


def _info_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmstack tokenizer info", description="Summarise a tokenizer directory.")
    parser.add_argument("tokenizer", help="tokenizer directory")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    print(f"model          {tokenizer.model_type}")
    print(f"vocab size     {tokenizer.vocab_size}")
    for role, token in tokenizer.special_tokens.roles().items():
        print(f"{role + '_token':<14} {token!r} (id {tokenizer.token_to_id(token)})")
    if tokenizer.special_tokens.extra:
        print(f"extra special  {', '.join(tokenizer.special_tokens.extra)}")
    print(f"chat template  {'yes' if tokenizer.chat_template else 'no'}")
    print(f"sha256         {tokenizer.sha256()}")
    return 0


_SUBCOMMANDS = {"train": _train_main, "encode": _encode_main, "decode": _decode_main, "info": _info_main}


def main(argv: list[str]) -> int:
    """Train a tokenizer (bpe, wordpiece, unigram, char), or encode, decode and inspect one."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: lmstack tokenizer {{{','.join(_SUBCOMMANDS)}}} [options]\n\n{__doc__}")
        return 0 if argv else 2
    if argv[0] not in _SUBCOMMANDS:
        print(f"lmstack tokenizer: unknown command {argv[0]!r} (choose from {', '.join(_SUBCOMMANDS)})",
              file=sys.stderr)
        return 2
    return _SUBCOMMANDS[argv[0]](argv[1:])
