"""A tiny model built here, and lmstack's server on it, run in-process by uvicorn on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random llama (context 256) with a byte-level BPE tokenizer and the ChatML template."""
    import pydoc_data.topics

    import lmstack
    from lmstack.tokenizer import train_tokenizer

    # English only: a CJK character encodes to several byte tokens (the U+FFFD test needs one split)
    tokenizer = train_tokenizer(iter(list(pydoc_data.topics.topics.values())[:40]), "bpe", 400, chat_template="chatml")
    torch.manual_seed(0)
    model = lmstack.Transformer(lmstack.preset("llama-tiny", vocab_size=tokenizer.vocab_size,
                                               eos_token_id=tokenizer.eos_token_id, init_std=0.2))
    directory = tmp_path_factory.mktemp("serve") / "tiny"
    lmstack.save_model(model, directory, extra_files=tokenizer.files())
    return directory


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    import lmstack
    from lmstack.tokenizer import Tokenizer

    return lmstack.load_model(tiny_model_dir).eval(), Tokenizer.load(tiny_model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `create_app(config)` on a thread; `url` is its base address."""

    def __init__(self, config, loader=None):
        import uvicorn

        from lmstack.serve.app import create_app

        config.port = free_port()
        self.app = create_app(config, loader)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=config.port,
                                                    log_level="warning", lifespan="on"))
        self.url = f"http://127.0.0.1:{config.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    @property
    def scheduler(self):
        return self.app.state.server.scheduler

    def wait_ready(self, timeout: float = 30.0) -> LiveServer:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"server at {self.url} not ready in {timeout} s")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def start_server(tiny_model_dir):
    """start_server(**ServeConfig fields) -> a ready LiveServer on the tiny model; closed after the test."""
    from lmstack.serve.config import ServeConfig

    servers = []

    def start(loader=None, wait=True, **fields):
        server = LiveServer(ServeConfig(**{"model": str(tiny_model_dir), "model_name": "tiny", **fields}), loader)
        servers.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """One server for a module's tests: 16 rows, a queue of 32."""
    from lmstack.serve.config import ServeConfig

    live = LiveServer(ServeConfig(model=str(tiny_model_dir), model_name="tiny", max_batch=16, max_queue=32))
    yield live.wait_ready()
    live.close()
