"""twinkle.model.files.has_weights: the one weight-file check of models, samplers and engines."""

from __future__ import annotations

import pytest
from twinkle.model.files import has_weights


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (["config.json"], False),
        (["config.json", "model.safetensors"], True),
        (["config.json", "model-00001-of-00002.safetensors"], True),
        (["config.json", "pytorch_model.bin"], True),
        (["config.json", "consolidated.pth"], True),
        (["adapter_config.json", "adapter_model.safetensors"], False),
        (["config.json", "optimizer.pt", "scheduler.pt", "rng_state_0.pt", "training_args.bin"], False),
    ],
)
def test_weight_files_and_what_is_not_one(tmp_path, files, expected):
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    assert has_weights(tmp_path) is expected
    assert has_weights(str(tmp_path)) is expected


def test_a_directory_named_like_weights_and_a_missing_directory(tmp_path):
    (tmp_path / "model.safetensors").mkdir()
    assert has_weights(tmp_path) is False
    assert has_weights(tmp_path / "missing") is False


def test_the_bundled_tiny_model_is_config_only():
    from pathlib import Path

    import twinkle

    tiny = Path(twinkle.__file__).parent / "assets" / "tiny-qwen2"
    assert (tiny / "config.json").is_file() and has_weights(tiny) is False
