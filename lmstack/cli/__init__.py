"""The `lmstack` command: a verb table {name: "module:function"}, one module per verb in this package.

Each verb's `main(argv) -> exit code` is imported only when run (or when `--help` lists them), so
`lmstack info` does not pay for the server or the data pipeline. A verb's one-line help is the first
line of its function's docstring. This package is the only place that parses argv.

Errors: an `LmstackError` (a user's mistake: lmstack.errors) prints as one line and exits 1; anything
else is a bug and raises with its traceback. LMSTACK_DEBUG=1 shows the traceback for both.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from lmstack.errors import LmstackError

VERBS: dict[str, str] = {
    "quickstart": "lmstack.cli.quickstart:main",
    "info": "lmstack.cli.info:main",
    "tokenizer": "lmstack.cli.tokenizer:main",
    "data": "lmstack.cli.data:main",
    "pretrain": "lmstack.cli.pretrain:main",
    "finetune": "lmstack.cli.finetune:main",
    "distill": "lmstack.cli.distill:main",
    "merge": "lmstack.cli.merge:main",
    "generate": "lmstack.cli.generate:main",
    "chat": "lmstack.cli.chat:main",
    "serve": "lmstack.cli.serve:main",
    "eval": "lmstack.cli.eval:main",
    "quantize": "lmstack.cli.quantize:main",
    "export": "lmstack.cli.export:main",
    "embed": "lmstack.cli.embed:main",
    "align": "lmstack.cli.align:main",
}


def _resolve(target: str) -> Callable[[list[str]], int]:
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def _usage() -> str:
    lines = ["usage: lmstack <verb> [options]   (lmstack <verb> --help for a verb's options)", "", "verbs:"]
    for name, target in VERBS.items():
        doc = (_resolve(target).__doc__ or "").strip().splitlines()
        lines.append(f"  {name:<12} {doc[0] if doc else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb in ("-V", "--version"):
        from lmstack import __version__
        print(__version__)
        return 0
    if verb not in VERBS:
        print(f"lmstack: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        return int(_resolve(VERBS[verb])(rest) or 0)
    except KeyboardInterrupt:
        print("\nlmstack: interrupted", file=sys.stderr)
        return 130
    except LmstackError as e:
        if os.environ.get("LMSTACK_DEBUG"):
            raise
        print(f"lmstack {verb}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
