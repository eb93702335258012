"""Fixtures for the fast-path tests: tiny random-weight Qwen2 configs (no downloads), the gpu marker."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_config():
    from fastpath_test_utils import tiny_qwen2_config

    return tiny_qwen2_config()
