"""`lmstack serve`: an OpenAI-compatible server (continuous batching, streaming, a chat page at /)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmstack.errors import CheckpointError, ConfigError
from lmstack.serve.config import ServeConfig


def main(argv: list[str]) -> int:
    """Serve a model over an OpenAI-compatible HTTP API, with a web chat page at / (needs the `serve` extra)."""
    parser = argparse.ArgumentParser(prog="lmstack serve", description=main.__doc__)
    parser.add_argument("--model", required=True, help="model directory (with its tokenizer)")
    parser.add_argument("--adapter", default=None, help="adapter directory applied to the model")
    parser.add_argument("--model-name", default=None, help="the model id clients send (default: the directory's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/*")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    parser.add_argument("--max-batch", type=int, default=8, help="KV pool rows: sequences decoded together (default 8)")
    parser.add_argument("--max-len", type=int, default=None,
                        help="KV slots per row: the longest prompt + completion (default: the model's context)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a row; then 429 (64)")
    parser.add_argument("--prefix-cache", type=int, default=4, help="shared prefixes (system prompts) kept; 0 = off")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--batch-wait-ms", type=float, default=2.0,
                        help="a request that finds the pool idle waits up to this long (ms) for others arriving "
                             "with it, to prefill and decode them together (default 2; 0 = off)")
    parser.add_argument("--engine", default="thread", choices=["thread", "process"],
                        help="run the model and scheduler on a thread of the server's process (default) or in a "
                             "process of their own, which does not share the HTTP side's GIL")
    parser.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")
    args = parser.parse_args(argv)
    config = ServeConfig(model=args.model, adapter=args.adapter, model_name=args.model_name, host=args.host,
                         port=args.port, api_key=args.api_key, device=args.device, max_batch=args.max_batch,
                         max_len=args.max_len, max_queue=args.max_queue, prefix_cache=args.prefix_cache,
                         compile=args.compile, batch_wait_ms=args.batch_wait_ms,
                         engine=args.engine)
    if not Path(config.model).is_dir():  # fail now rather than serve 503s about it
        raise CheckpointError(f"{config.model}: no such model directory (--model)")
    try:
        import uvicorn

        from lmstack.serve.app import create_app
    except ImportError as e:
        raise ConfigError(f"lmstack serve needs FastAPI and uvicorn ({e.name} is missing): "
                          "pip install 'lmstack[serve]'") from None
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=args.log_level)
    return 0
