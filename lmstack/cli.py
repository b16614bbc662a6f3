"""The `lmstack` command: a verb table {name: "module:function"}; each function takes argv and returns an exit code.

Verbs are imported only when run (or when `--help` lists them), so `lmstack info` does not pay for the
server or the data pipeline. A verb's one-line help is the first line of its function's docstring.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

VERBS: dict[str, str] = {
    "info": "lmstack.info:main",
    "tokenizer": "lmstack.tokenizer_cli:main",
    "data": "lmstack.data.cli:main",
    "pretrain": "lmstack.train.pretrain:main",
    "generate": "lmstack.generate.cli:generate_main",
    "chat": "lmstack.generate.cli:chat_main",
    "quickstart": "lmstack.quickstart:main",
}


class UserError(Exception):
    """An error caused by the user's input: printed as one line, no traceback."""


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
    if not argv or argv[0] in ("-h", "--help", "help"):
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
    except (UserError, ValueError, OSError) as e:
        # Our own errors (ConfigError, CheckpointError, ...) subclass ValueError and already name the
        # file/key; print them as one line. LMSTACK_DEBUG=1 shows the traceback.
        import os
        if os.environ.get("LMSTACK_DEBUG"):
            raise
        print(f"lmstack {verb}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
