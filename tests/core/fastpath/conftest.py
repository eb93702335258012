"""Fixtures for the fast-path tests: tiny random-weight Qwen2 configs (no downloads), the gpu marker."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and "fastpath" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_config():
    from fastpath_test_utils import tiny_qwen2_config

    return tiny_qwen2_config()
