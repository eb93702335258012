"""Shared fixtures for TransformersModel tests: tiny random-weight models built from configs (no downloads)."""

from __future__ import annotations

import pytest
from model_test_utils import make_rows
from twinkle.testing import torch_threads, write_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A model directory with the bundled tokenizer and a smaller Qwen2 config.json (no weights)."""
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def rows() -> list[dict]:
    return make_rows(8)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, spinning OpenMP threads make tiny models 10x slower."""
    with torch_threads(1):
        yield
