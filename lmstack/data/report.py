"""The data report: what `lmstack data prepare` read, dropped, deduplicated and wrote (JSON + Markdown).

The JSON is the record (data_report.json, format `lmstack-data-report-v1`); the Markdown is the
same numbers for a human (data_report.md). `lmstack data report OUT` prints the Markdown again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmstack.data.clean import QualityFilter
from lmstack.data.dedup import choose_bands
from lmstack.schema import read_json

if TYPE_CHECKING:  # only for annotations: pipeline imports this module
    from lmstack.data.pack import IndexHeader
    from lmstack.data.pipeline import PrepareConfig, Stage1Stats

REPORT_FORMAT = "lmstack-data-report-v1"


def build_report(cfg: PrepareConfig, stage1: Stage1Stats, shard_metas: list[dict], train_index: dict,
                 val_index: dict, header: IndexHeader, *, tokenize_seconds: float, total_seconds: float) -> dict:
    """Assemble the report dict from the stage-1 counts, the finished shards and the two indexes."""
    ingest = stage1.ingest
    chars = sum(m["num_chars"] for m in shard_metas)
    text_bytes = sum(m["num_bytes"] for m in shard_metas)
    tokens = train_index["num_tokens"] + val_index["num_tokens"]
    documents_out = sum(stage1.kept.values())
    text_tokens = tokens - documents_out  # one eos per document is not text
    bands, rows = choose_bands(cfg.dedup.num_perm, cfg.dedup.threshold, cfg.dedup.min_candidate_recall)
    dropped = {rule: stage1.filtered.get(rule, 0) for rule in QualityFilter.RULES}
    dropped.update({k: v for k, v in stage1.filtered.items() if k not in dropped})
    return {
        "format": REPORT_FORMAT,
        "source": cfg.corpus or list(cfg.inputs),
        "documents_in": ingest["documents"],
        "ingest": {k: v for k, v in ingest.items() if k != "warnings"},
        "warnings": ingest.get("warnings", []),
        "filters": {"enabled": cfg.clean, "dropped": dropped, "dropped_total": sum(dropped.values())},
        "dedup": {"exact_enabled": cfg.dedup.exact, "near_enabled": cfg.dedup.near,
                  "exact_removed": stage1.exact_duplicates, "near_removed": stage1.near_duplicates,
                  "near_threshold": cfg.dedup.threshold, "num_perm": cfg.dedup.num_perm,
                  "shingle_size": cfg.dedup.shingle_size, "lsh_bands": bands, "lsh_rows": rows,
                  "near_candidates_checked": stage1.near_candidates_checked},
        "documents_out": documents_out,
        "split": {"mode": cfg.split, "val_fraction": cfg.val_fraction,
                  "train": {"documents": train_index["num_documents"], "tokens": train_index["num_tokens"],
                            "shards": len(train_index["shards"])},
                  "val": {"documents": val_index["num_documents"], "tokens": val_index["num_tokens"],
                          "shards": len(val_index["shards"])}},
        "tokens_out": tokens,
        "characters_out": chars,
        "bytes_out": text_bytes,
        "chars_per_token": chars / text_tokens if text_tokens else 0.0,
        "tokenizer": {"sha256": header.tokenizer_sha256, "vocab_size": header.vocab_size,
                      "eos_token_id": header.eos_token_id, "dtype": train_index["dtype"],
                      "trained": cfg.train_tokenizer, "loaded_from": cfg.tokenizer},
        "seconds": {"clean_and_dedup": round(stage1.seconds, 3), "tokenize": round(tokenize_seconds, 3),
                    "total": round(total_seconds, 3)},
        "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
    }


def render_markdown(report: dict) -> str:
    """The report as Markdown tables."""
    ing, filt, dd, sp = report["ingest"], report["filters"], report["dedup"], report["split"]
    source = report["source"] if isinstance(report["source"], str) else ", ".join(report["source"])
    lines = [
        "# Data report", "",
        f"Source: `{source}`", "",
        "| | count |", "| --- | ---: |",
        f"| files read | {ing['files']} |",
        f"| records read | {ing['records']} |",
        f"| documents in | {report['documents_in']} |",
        f"| empty documents skipped | {ing['empty_documents']} |",
        f"| malformed JSONL lines skipped | {ing['malformed_lines']} |",
        f"| records without the text field | {ing['missing_field'] + ing['non_string_field']} |",
        f"| invalid UTF-8 bytes replaced | {ing['invalid_utf8_bytes']} (in {ing['documents_with_invalid_utf8']} documents) |",
        f"| dropped by quality filters | {filt['dropped_total']} |",
        f"| exact duplicates removed | {dd['exact_removed']} |",
        f"| near duplicates removed (Jaccard >= {dd['near_threshold']}) | {dd['near_removed']} |",
        f"| documents out | {report['documents_out']} |",
        f"| tokens out | {report['tokens_out']} |",
        f"| characters out | {report['characters_out']} |",
        f"| characters per token | {report['chars_per_token']:.3f} |",
        "",
        "## Quality filters" + ("" if filt["enabled"] else " (disabled: --no-clean)"), "",
        "Each document is charged to the first rule it fails.", "",
        "| rule | dropped |", "| --- | ---: |",
        *[f"| {rule} | {n} |" for rule, n in filt["dropped"].items()],
        "",
        "## Split", "",
        f"Mode `{sp['mode']}`, val fraction {sp['val_fraction']}.", "",
        "| split | documents | tokens | shards |", "| --- | ---: | ---: | ---: |",
        *[f"| {name} | {sp[name]['documents']} | {sp[name]['tokens']} | {sp[name]['shards']} |" for name in ("train", "val")],
        "",
        "## Tokenizer and timing", "",
        f"- tokenizer sha256 `{report['tokenizer']['sha256']}`, vocab {report['tokenizer']['vocab_size']}, "
        f"eos id {report['tokenizer']['eos_token_id']}, shards in {report['tokenizer']['dtype']}",
        f"- MinHash: {dd['num_perm']} permutations, {dd['lsh_bands']} bands x {dd['lsh_rows']} rows, "
        f"{dd['shingle_size']}-word shingles, {dd['near_candidates_checked']} candidate pairs verified exactly",
        f"- seconds: clean+dedup {report['seconds']['clean_and_dedup']}, tokenize {report['seconds']['tokenize']}, "
        f"total {report['seconds']['total']}",
    ]
    if report.get("warnings"):
        lines += ["", "## First warnings", "", *[f"- {w}" for w in report["warnings"]]]
    return "\n".join(lines) + "\n"


def write_report(directory: Path, report: dict[str, Any]) -> None:
    (directory / "data_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (directory / "data_report.md").write_text(render_markdown(report), encoding="utf-8")


def load_report(output: Path) -> dict:
    return read_json(output / "data_report.json", ValueError,
                     f"not found (is {output} the output of `lmstack data prepare`?)")
