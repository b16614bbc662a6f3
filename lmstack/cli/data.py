"""`lmstack data`: prepare token shards from raw text (`prepare`) and show a finished run's report (`report`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lmstack.cli.args import PRINT_CONFIG_HELP, add_out, non_negative_int, number, positive_int, print_config
from lmstack.data.builtin import BUILTIN_QUALITY_DEFAULTS, corpus_names
from lmstack.schema import apply_overrides, from_sources, load_yaml, override_flags

# argparse destination -> PrepareConfig key (dotted for nested sections)
_FLAG_KEYS = {
    "input": "inputs", "corpus": "corpus", "format": "format", "text_field": "text_field", "text_unit": "text_unit",
    "strict": "strict", "tokenizer": "tokenizer", "train_tokenizer": "train_tokenizer", "out": "output",
    "split": "split", "val_fraction": "val_fraction", "shard_chars": "shard_chars", "workers": "workers",
    "overwrite": "overwrite", "near_threshold": "dedup.threshold", "num_perm": "dedup.num_perm",
}


def _prepare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmstack data prepare",
        description="Raw text -> cleaned, deduplicated, tokenised shards (OUT/train, OUT/val, OUT/tokenizer, "
                    "OUT/data_report.{json,md}). Any PrepareConfig field can also be set as --key=value, e.g. "
                    "--quality.min_words=20 --quality.max_top_ngram_char_fraction={} --dedup.shingle_size=3.",
        allow_abbrev=False)
    src = p.add_argument_group("input")
    src.add_argument("--input", nargs="+", metavar="PATH", help="files, directories (recursive) or glob patterns")
    src.add_argument("--corpus", help=f"a built-in corpus instead: {', '.join('builtin:' + n for n in corpus_names())}")
    src.add_argument("--format", choices=["auto", "text", "jsonl", "parquet"],
                     help="input format (auto: by suffix; .gz is detected by content) [auto]")
    src.add_argument("--text-field", help="JSONL field (dotted for nested) or Parquet column [text]")
    src.add_argument("--text-unit", choices=["file", "paragraph", "line"],
                     help="one document per text file, blank-line paragraph, or line [file]")
    src.add_argument("--strict", action="store_true", default=None,
                     help="a malformed JSONL line or missing field is an error (default: skipped and counted)")
    tok = p.add_argument_group("tokenizer (one of)")
    tok.add_argument("--tokenizer", metavar="DIR", help="a tokenizer directory (tokenizer.json + tokenizer_config.json)")
    tok.add_argument("--train-tokenizer", metavar="KIND:VOCAB",
                     help="train one on the cleaned, deduplicated train text: bpe:8192, unigram:8000, wordpiece:8000, char")
    proc = p.add_argument_group("processing")
    proc.add_argument("--no-clean", action="store_true", help="no normalisation and no quality filters")
    proc.add_argument("--no-dedup", action="store_true", help="no exact and no near-duplicate removal")
    proc.add_argument("--no-near-dedup", action="store_true", help="exact dedup only")
    proc.add_argument("--near-threshold", type=number, help="Jaccard threshold of a near duplicate [0.8]")
    proc.add_argument("--num-perm", type=positive_int, help="MinHash signature length [128]")
    out = p.add_argument_group("output")
    add_out(out, "--output", "-o", metavar="OUT", help="output directory (created atomically)")
    out.add_argument("--split", choices=["document", "tail"],
                     help="document: whole documents go to val; tail: the last val-fraction of the token stream [document]")
    out.add_argument("--val-fraction", type=number,
                     help="fraction of documents (or tokens, with --split tail) for val; 0 = no validation split [0.05]")
    out.add_argument("--shard-chars", type=positive_int, metavar="N",
                     help="characters of text per shard (~N/4 tokens of English BPE) [64000000]")
    out.add_argument("--shard-size-mb", type=number, help=argparse.SUPPRESS)  # its old name: millions of characters
    out.add_argument("--workers", type=non_negative_int, help="worker processes for cleaning and tokenisation [2]")
    out.add_argument("--overwrite", action="store_true", default=None, help="replace an existing OUT")
    p.add_argument("--config", metavar="YAML", help="a YAML file of PrepareConfig fields (flags override it)")
    p.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    return p


def build_config(argv: list[str]) -> Any:
    """argv -> PrepareConfig: defaults < built-in corpus defaults < --config YAML < flags < --key=value.

    An invalid value is reported where it came from: the flag (or --key=value) that set it, else the YAML file.
    """
    from lmstack.data.pipeline import PrepareConfig

    parser = _prepare_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--") and "=" in a]
    unknown = [a for a in rest if a not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    data: dict[str, Any] = {}
    if args.corpus:
        quality = BUILTIN_QUALITY_DEFAULTS.get(args.corpus.removeprefix("builtin:"))
        if quality:
            data["quality"] = dict(quality)
    if args.config:
        file_data = load_yaml(args.config)
        for key, value in file_data.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
    file_only = json.loads(json.dumps(data))
    flags: dict[str, str] = {}
    if args.shard_size_mb is not None:  # the old flag's meaning: millions of characters
        args.shard_chars = args.shard_chars or max(1, int(args.shard_size_mb * 1_000_000))
    for dest, key in _FLAG_KEYS.items():
        value = getattr(args, dest)
        if value is not None:
            section, _, leaf = key.rpartition(".")
            (data.setdefault(section, {}) if section else data)[leaf] = value
            flags[key] = "--" + dest.replace("_", "-")
    if args.no_clean:
        data["clean"] = False
    if args.no_dedup:
        data.setdefault("dedup", {}).update(exact=False, near=False)
    if args.no_near_dedup:
        data.setdefault("dedup", {})["near"] = False
    data = apply_overrides(data, overrides)
    return from_sources(PrepareConfig, data, path=args.config, file_data=file_only,
                        flags={**flags, **override_flags(overrides)}), args.print_config


def prepare_main(argv: list[str]) -> int:
    """Clean, deduplicate and tokenise text into memory-mapped shards with a data report."""
    from lmstack.data.pipeline import prepare

    cfg, show = build_config(argv)
    if show:
        return print_config(cfg)
    report = prepare(cfg)
    split = report["split"]
    print(f"wrote {cfg.output}: {report['documents_out']} documents of {report['documents_in']} "
          f"(filtered {report['filters']['dropped_total']}, exact dups {report['dedup']['exact_removed']}, "
          f"near dups {report['dedup']['near_removed']}); train {split['train']['tokens']} tokens / "
          f"val {split['val']['tokens']} tokens; {report['chars_per_token']:.2f} chars/token; "
          f"report in {Path(cfg.output) / 'data_report.md'}")
    return 0


def report_main(argv: list[str]) -> int:
    """Print the data report of a finished `prepare` output directory."""
    from lmstack.data.report import load_report, render_markdown

    p = argparse.ArgumentParser(prog="lmstack data report", description=report_main.__doc__)
    p.add_argument("output", help="an output directory of `lmstack data prepare`")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of Markdown")
    args = p.parse_args(argv)
    report = load_report(Path(args.output))
    print(json.dumps(report, indent=2) if args.json else render_markdown(report), end="" if not args.json else "\n")
    return 0


SUBVERBS = {"prepare": prepare_main, "report": report_main}


def main(argv: list[str]) -> int:
    """Data pipeline: `prepare` text into cleaned, deduplicated token shards; `report` on a finished run."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lmstack data {prepare,report} [options]\n")
        for name, fn in SUBVERBS.items():
            print(f"  {name:<10} {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    if argv[0] not in SUBVERBS:
        print(f"lmstack data: unknown sub-command {argv[0]!r} (choose from {', '.join(SUBVERBS)})", file=sys.stderr)
        return 2
    return SUBVERBS[argv[0]](argv[1:])
