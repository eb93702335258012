"""Shared fixtures: one real `twinkle serve` app on 127.0.0.1 (ephemeral port) per test session.

The server runs uvicorn in a background thread of the test process, so tests talk to it over
real HTTP on loopback. Tenants are created in its SQLite store directly (as
`twinkle serve --add-tenant` does).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

os.environ.setdefault("TINKER_TELEMETRY", "0")

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@dataclass
class RunningServer:
    """A server on loopback: its URL, app state and a helper to add tenants."""

    url: str
    app: Any
    server: Any
    thread: threading.Thread

    @property
    def state(self) -> Any:
        return self.app.state.twinkle

    def add_tenant(self, name: str, **quotas: Any) -> str:
        """Create a tenant; returns its API key."""
        _, key = self.state.store.create_tenant(name, **quotas)
        return key

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(config: Any, engine: Any = None) -> RunningServer:
    """Start `create_app(config)` with uvicorn on 127.0.0.1, port chosen by the OS."""
    import uvicorn
    from twinkle_server.app import create_app

    app = create_app(config, engine=engine)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(f"http://127.0.0.1:{port}", app, server, thread)


@pytest.fixture(scope="session")
def server_factory() -> Any:
    """``start_server(config, engine=None)`` for tests that need a server of their own (stop it after)."""
    return start_server


@pytest.fixture(scope="session")
def engine() -> Any:
    """One tiny base model with a pool of LoRA slots, shared by the session's servers."""
    from twinkle_server.config import tiny_model_dir
    from twinkle_server.engine import LoRAEngine

    # every adapter counts against the pool (Tinker runs and the twinkle API's objects alike), and
    # the session's modules share this engine: room for all of them
    return LoRAEngine(tiny_model_dir(), max_adapters=256, max_rank=32)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, engine: Any) -> Iterator[RunningServer]:
    """The shared server (state in a temporary directory)."""
    from twinkle_server.config import ServerConfig

    config = ServerConfig(
        state_dir=tmp_path_factory.mktemp("serve"),
        max_adapters=64,
        max_rank=32,
        max_body_bytes=2 * 1024 * 1024,
        max_adapters_per_tenant=4,
        long_poll_s=2.0,
    )
    running = start_server(config, engine)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    from transformers import AutoTokenizer
    from twinkle_server.config import tiny_model_dir

    return AutoTokenizer.from_pretrained(tiny_model_dir())


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_pool_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server of its own with a pool of 4 LoRA slots (eviction tests); its engine is built from the config."""
    from twinkle_server.config import ServerConfig

    config = ServerConfig(
        state_dir=tmp_path_factory.mktemp("small-pool"), max_adapters=4, max_rank=8, long_poll_s=2.0, device="cpu"
    )
    running = start_server(config)
    yield running
    running.stop()
