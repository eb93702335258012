"""Shared fixtures for TransformersModel tests: tiny random-weight models built from configs (no downloads)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from model_test_utils import make_rows

ASSETS = Path(__file__).resolve().parents[3] / "twinkle_core" / "src" / "twinkle" / "assets"
TINY_QWEN2 = ASSETS / "tiny-qwen2"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A model directory with the bundled tokenizer and a smaller Qwen2 config.json (no weights)."""
    root = tmp_path_factory.mktemp("tiny-model")
    for file in TINY_QWEN2.iterdir():
        if file.name != "config.json":
            shutil.copy2(file, root / file.name)
    config = json.loads((TINY_QWEN2 / "config.json").read_text())
    config.update(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    (root / "config.json").write_text(json.dumps(config))
    return str(root)


@pytest.fixture
def rows() -> list[dict]:
    return make_rows(8)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, spinning OpenMP threads make tiny models 10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
