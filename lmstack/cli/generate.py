"""`lmstack generate`: prompts in, completions out (text, or JSONL with ids, finish reasons and logprobs).

Every GenerationConfig field is a flag (`--top-p 0.9`, `--stop "\\n\\n"` repeatable, `--logprobs`); a
YAML file of the same fields can be given with `--config`, flags win over it.

Plain-text output: one completion is printed as it is generated; several (prompts, or beams of
`--num-return-sequences`) are each printed under a header line `=== N: "prompt" ===`, since the texts
themselves may hold newlines. `--jsonl` (or `--out FILE`) gives one JSON object per prompt instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from lmstack.atomic import atomic_file
from lmstack.cli.args import add_out, integer, number, positive_int, text_arg
from lmstack.device import resolve_device
from lmstack.errors import CheckpointError, ConfigError, DataError, InputFileError
from lmstack.generate.api import bind_encoder, generate
from lmstack.generate.config import GenerationConfig
from lmstack.generate.prompts import encode_prompts
from lmstack.generate.results import GenerationOutput
from lmstack.generate.run import GenerationRun
from lmstack.schema import decode_utf8, from_dict, load_yaml

# ------------------------------------------------------------------------------------------- shared flags


DEVICE_HELP = "cpu, cuda, cuda:N, or auto (a GPU when torch sees one) (default: cpu)"


def add_generation_flags(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """One flag per GenerationConfig field, typed from the dataclass; unset flags stay None (= default).
    `defaults`: the verb's own defaults over the dataclass's (what --help shows is what is used)."""
    group = parser.add_argument_group("decoding options (GenerationConfig fields)")
    hints = typing.get_type_hints(GenerationConfig)
    for f in dataclasses.fields(GenerationConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = (defaults or {}).get(f.name, default)
        help_text = f"default {default!r}"
        if f.name == "early_stopping":
            group.add_argument(flag, choices=["true", "false", "never"], default=None, help=help_text)
        elif f.name == "add_special_tokens":  # on by default: the flag turns it off
            group.add_argument("--no-special-tokens", dest=f.name, action="store_false", default=None,
                               help="encode text prompts without the tokenizer's special tokens (e.g. no BOS)")
        elif tp is bool:
            group.add_argument(flag, action="store_true", default=None, help=help_text)
        elif f.name == "stop":
            group.add_argument(flag, action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
        elif f.name == "eos_token_ids":
            group.add_argument(flag, type=integer, nargs="+", default=None, metavar="ID", help="default: the model's")
        else:
            base = next(a for a in typing.get_args(tp) if a is not type(None)) if typing.get_args(tp) else tp
            parse = {int: integer, float: number}.get(base, base)  # the wording every verb uses for a bad number
            group.add_argument(flag, type=parse, default=None, metavar=base.__name__.upper(), help=help_text)
    group.add_argument("--config", type=Path, help="YAML file of GenerationConfig fields (flags override it)")


def config_from_args(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> GenerationConfig:
    """defaults < --config YAML < flags, validated by the schema (errors name the field and the file)."""
    data = dict(defaults or {})
    if args.config is not None:
        data.update(load_yaml(args.config))
    for f in dataclasses.fields(GenerationConfig):
        value = getattr(args, f.name)
        if value is not None:
            data[f.name] = {"true": True, "false": False}.get(value, value) if f.name == "early_stopping" else value
    try:
        return from_dict(GenerationConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{args.config}: {e}" if args.config is not None else str(e)) from None


def load_model_and_tokenizer(directory: Path, device: str | None, adapter: Path | None = None) -> tuple[Any, Any]:
    """The model (with `adapter` folded in: exact in fp32, and decoding runs at the base model's speed) and the
    tokenizer (the adapter's when it carries one: it may hold chat markers the base lacks)."""
    from lmstack.adapters import unload
    from lmstack.interop.hf import load_model
    from lmstack.tokenizer import Tokenizer

    # an unknown device or CUDA on a CPU-only torch: one DeviceError before anything is read
    device = resolve_device(device if device is not None else "cpu")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such model directory")
    if adapter is not None and not adapter.is_dir():
        raise CheckpointError(f"{adapter}: no such adapter directory")
    has_tokenizer = adapter is not None and (adapter / "tokenizer.json").is_file()
    tokenizer = Tokenizer.load(adapter if has_tokenizer else directory)
    model = load_model(directory, adapter=adapter)
    if adapter is not None:
        model = unload(model)
    return (model.to(device) if device is not None else model).eval(), tokenizer


# ------------------------------------------------------------------------------------------- generate


def _read_prompts_file(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line; a record has "prompt" (text) or "messages" (chat)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputFileError(f"{path}: cannot read prompts file ({(e.strerror or str(e)).lower()})") from None
    lines = decode_utf8(data, str(path), InputFileError, "save it as UTF-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object with \"prompt\" or \"messages\"")
        if isinstance(record.get("prompt"), str) == isinstance(record.get("messages"), list):
            raise DataError(f"{path}:{number}: give exactly one of \"prompt\" (a string) or \"messages\" (a list)")
        yield number, record


def _prompt_ids(record: dict[str, Any], tokenizer: Any, chat: bool, system: str | None, where: str,
                config: GenerationConfig) -> list[int]:
    """A plain prompt is encoded as `tok(text)` (special tokens unless --no-special-tokens); a chat rendered
    from the template without them, as transformers' apply_chat_template(tokenize=True): the template
    writes its own (a Llama template's BOS would otherwise be doubled)."""
    if "messages" in record:
        messages = record["messages"]
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                   for m in messages):
            raise DataError(f"{where}: each message needs string \"role\" and \"content\"")
    elif chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": record["prompt"]}]
    else:
        return encode_prompts(record["prompt"], tokenizer, config.add_special_tokens)[0]
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                            add_special_tokens=False)


def _record(source: dict[str, Any], out: GenerationOutput, row: int) -> dict[str, Any]:
    result: dict[str, Any] = {k: source[k] for k in ("id", "prompt", "messages") if k in source}
    result.update(text=out.texts[row], token_ids=out.token_ids[row], finish_reason=out.finish_reasons[row])
    if out.logprobs is not None:
        result["logprobs"] = out.logprobs[row]
    if out.top_logprobs is not None:
        result["top_logprobs"] = [{str(k): v for k, v in step.items()} for step in out.top_logprobs[row]]
    if out.beams is not None:
        result["beams"] = [{"text": b.text, "token_ids": b.token_ids, "score": b.score} for b in out.beams[row]]
    return result


def main(argv: list[str]) -> int:
    """Generate text from a model directory: --prompt "..." (repeatable) or --prompts-file in.jsonl -> JSONL."""
    parser = argparse.ArgumentParser(prog="lmstack generate", description=main.__doc__)
    parser.add_argument("--model", type=Path, required=True, help="model directory (with tokenizer.json)")
    parser.add_argument("--adapter", type=Path, help="an adapter directory for --model (peft format: LoRA, DoRA, "
                        "IA3, prompt / P- / prefix tuning; or lmstack bottleneck)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeatable: one batch)")
    source.add_argument("--prompts-file", type=Path, help='JSONL: {"prompt": "..."} or {"messages": [...]}, '
                        'optional "id"; writes one JSON line per prompt')
    add_out(parser, "--output", "-o", type=Path, metavar="FILE",
            help="write the JSONL here (atomically) instead of stdout")
    parser.add_argument("--jsonl", action="store_true", help="print results as JSONL (one object per prompt); "
                        'plain text prints several results under `=== N: "prompt" ===` headers')
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the chat template")
    parser.add_argument("--system", help="system message (with --chat)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="prompts generated together (default 8)")
    parser.add_argument("--draft-model", type=Path, help="draft model directory: speculative decoding (greedy)")
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    parser.add_argument("--stats", action="store_true", help="print prefill/decode timing to stderr")
    add_generation_flags(parser)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    if args.system is not None and not args.chat:
        raise ConfigError("--system is the system message of a chat prompt: add --chat (each --prompt becomes a "
                          "user turn), or use `lmstack chat`")
    system = text_arg(args.system, "--system") if args.system is not None else None
    model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.adapter)
    draft = load_model_and_tokenizer(args.draft_model, args.device)[0] if args.draft_model else None
    if args.prompts_file is not None:
        records = [(f"{args.prompts_file}:{n}", r) for n, r in _read_prompts_file(args.prompts_file)]
    else:
        records = [("--prompt", {"prompt": text_arg(p, "--prompt")}) for p in args.prompt]
    prompts = [_prompt_ids(r, tokenizer, args.chat, system, where, config) for where, r in records]
    as_jsonl = args.jsonl or args.prompts_file is not None or args.out is not None

    if not as_jsonl and len(prompts) == 1 and config.num_beams == 1 and draft is None:
        decoder, decoder_prompts = bind_encoder(model, tokenizer, prompts, config, None)  # T5: its bound decoder
        run = GenerationRun(decoder, tokenizer, decoder_prompts, config)
        for event in run.events():  # show tokens as they come
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if args.stats:
            _print_stats(run.output())
        return 0
    from torch._dynamo.utils import (
        counters as dynamo_counters,  # tells --stats when a batch paid for compiling
    )

    results = []
    for start in range(0, len(prompts), args.batch_size):
        graphs = dynamo_counters["stats"]["unique_graphs"]
        out = generate(model, tokenizer, prompts[start:start + args.batch_size], config=config, draft_model=draft)
        if args.stats:
            _print_stats(out, compiled_now=dynamo_counters["stats"]["unique_graphs"] > graphs)
        results += [_record(records[start + i][1], out, i) for i in range(len(out.token_ids))]
    if not as_jsonl:
        _print_plain(results)
    elif args.out is not None:
        with atomic_file(args.out) as f:
            _write_jsonl(f, results)
    else:
        _write_jsonl(sys.stdout, results)
    return 0


def _print_plain(results: list[dict[str, Any]]) -> None:
    """One result: its text. Several (prompts or returned beams): each under a header naming it, because a
    text may itself contain newlines (joining them with newlines would hide where one ends)."""
    texts = [(i, r, beam) for i, r in enumerate(results, 1)
             for beam in (r["beams"] if len(r.get("beams") or []) > 1 else [None])]
    if len(texts) == 1:
        print(results[0]["text"])
        return
    for i, record, beam in texts:
        source = record.get("prompt", "chat")
        shown = json.dumps(source if len(source) <= 60 else source[:57] + "...", ensure_ascii=False)
        which = f" (beam {record['beams'].index(beam) + 1} of {len(record['beams'])}, score {beam['score']:.3f})" \
            if beam is not None else ""
        print(f"=== {i}: {shown}{which} ===")
        print(beam["text"] if beam is not None else record["text"])


def _write_jsonl(f: TextIO, records: list[dict[str, Any]]) -> None:
    for record in records:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _print_stats(out: GenerationOutput, compiled_now: bool = False) -> None:
    s = out.stats
    line = (f"prefill {s.prompt_tokens} tokens in {s.prefill_s * 1e3:.1f} ms; decode {s.new_tokens} tokens in "
            f"{s.decode_s * 1e3:.1f} ms ({s.decode_tokens_per_s:.1f} tok/s)")
    if s.acceptance_rate is not None:
        line += f"; draft acceptance {s.acceptance_rate:.1%}"
    if compiled_now:  # a new batch size or cache length: --compile compiled a graph during this batch
        line += " (includes compiling the decode step)"
    print(line, file=sys.stderr)
