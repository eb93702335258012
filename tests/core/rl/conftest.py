"""Fixtures for the RL tests: a smaller tiny-qwen2 directory (bundled tokenizer, config only: random init)."""

from __future__ import annotations

import pytest
from twinkle.testing import write_tiny_model_dir


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU)")


@pytest.fixture(scope="session")
def rl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The bundled tokenizer with a 2-layer, 64-wide Qwen2 config (weights initialized from a seed)."""
    return write_tiny_model_dir(tmp_path_factory.mktemp("rl-tiny-model"))


@pytest.fixture(scope="session")
def rl_sampler(rl_model_dir: str):
    """One TorchSampler shared by the sampler tests (they do not change its weights)."""
    from twinkle.sampler import TorchSampler

    return TorchSampler(model_id=rl_model_dir, device="cpu", seed=7)


def chat(content: str, **user_data) -> dict:
    return {"messages": [{"role": "user", "content": content}], "user_data": user_data}
