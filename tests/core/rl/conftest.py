"""Fixtures for the RL tests: a smaller tiny-qwen2 directory (bundled tokenizer, config only: random init)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

TINY_QWEN2 = Path(__file__).resolve().parents[3] / "twinkle_core" / "src" / "twinkle" / "assets" / "tiny-qwen2"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU)")


@pytest.fixture(scope="session")
def rl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The bundled tokenizer with a 2-layer, 64-wide Qwen2 config (weights initialized from a seed)."""
    root = tmp_path_factory.mktemp("rl-tiny-model")
    for file in TINY_QWEN2.iterdir():
        if file.name != "config.json":
            shutil.copy2(file, root / file.name)
    config = json.loads((TINY_QWEN2 / "config.json").read_text())
    config.update(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    (root / "config.json").write_text(json.dumps(config))
    return str(root)


@pytest.fixture(scope="session")
def rl_sampler(rl_model_dir: str):
    """One TorchSampler shared by the sampler tests (they do not change its weights)."""
    from twinkle.sampler import TorchSampler

    return TorchSampler(model_id=rl_model_dir, device="cpu", seed=7)


def chat(content: str, **user_data) -> dict:
    return {"messages": [{"role": "user", "content": content}], "user_data": user_data}
