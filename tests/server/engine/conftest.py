"""Fixtures for the Tinker engine tests: a tiny model directory (bundled tokenizer, seeded weights, no downloads).

Nothing here imports fastapi, uvicorn or tinker: the engine runs without the http extra.
"""

from __future__ import annotations

import pytest
from twinkle.testing import torch_threads, write_tiny_model_dir


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A model directory with the bundled tokenizer and a 2-layer, 64-wide Qwen2 config.json (no weights)."""
    return write_tiny_model_dir(tmp_path_factory.mktemp("engine-model"))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, spinning OpenMP threads make tiny models slower."""
    with torch_threads(1):
        yield
