"""Fixtures for the data pipeline tests: the bundled tiny tokenizer and data sets (no network)."""

from __future__ import annotations

import pytest
from twinkle import assets


@pytest.fixture(scope="session")
def tiny_dir() -> str:
    """The bundled tiny-qwen2 directory (tokenizer + config, no weights)."""
    return str(assets.path("tiny-qwen2"))


@pytest.fixture(scope="session")
def data_file():
    """``data_file('alpaca_tiny.jsonl')`` -> the bundled file's path."""
    return lambda name: str(assets.path(f"datasets/{name}"))


@pytest.fixture(scope="session")
def template(tiny_dir: str):
    from twinkle.template.base import Template

    return Template(tiny_dir)


@pytest.fixture(scope="session")
def seed_dataset(tiny_dir: str, data_file):
    """The seed's data lines, ids swapped for the bundled data set and tokenizer."""
    from twinkle.dataset import Dataset, DatasetMeta
    from twinkle.preprocessor import SelfCognitionProcessor

    dataset = Dataset(dataset_meta=DatasetMeta(data_file("self_cognition.jsonl"), data_slice=range(1000)))
    dataset.set_template("Template", model_id=tiny_dir)
    dataset.map(SelfCognitionProcessor("twinkle大模型", "ModelScope社区"))
    dataset.encode()
    return dataset
