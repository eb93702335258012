"""The benchmark's FLOP accounting reproduces the issue's MFU figures, and the checkpointing estimate behaves."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    """benchmarks/train_throughput.py as a module (it imports model_shapes from its folder, as a script does)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        return _load("train_throughput")


@pytest.fixture(scope="module")
def shapes():
    return _load("model_shapes")


@pytest.mark.parametrize(
    ("row", "tokens_per_s", "mfu"),
    [
        # the issue's "plain + Liger" column: tok/s and the MFU it states
        ("0.5b-lora", 89.4e3, 0.23),
        ("0.5b-full", 106.3e3, 0.38),
        ("7b-lora", 16.1e3, 0.50),
        ("7b-lora", 10.0e3, 0.31),
    ],
)
def test_mfu_matches_the_issue_table(bench, shapes, row, tokens_per_s, mfu):
    shape, lora, _ = bench.ROWS[row]
    got = tokens_per_s * shapes.flops_per_token(shape, lora, bench.SEQ_LEN) / (shapes.PEAK_TFLOPS * 1e12)
    assert got == pytest.approx(mfu, abs=0.006)


def test_matmul_params_count_the_head_once_when_tied(shapes):
    small = shapes.matmul_params(shapes.QWEN25_05B)
    assert 0.48e9 < small < 0.50e9  # Qwen2.5-0.5B: 494M parameters, embedding = head
    big = shapes.matmul_params(shapes.QWEN25_7B)
    assert 7.0e9 < big < 7.1e9  # 7.6B minus the untied input embedding


def test_activation_estimate_grows_with_tokens_and_drops_with_the_fused_head():
    from fastpath_test_utils import tiny_qwen2_config
    from twinkle.patch.checkpointing import activation_bytes

    config = tiny_qwen2_config(vocab_size=152000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24)
    small, large = activation_bytes(config, 4096), activation_bytes(config, 16384)
    assert large > 3.5 * small
    assert activation_bytes(config, 16384, fused_head=False) > large + 16384 * 152000 * 8
    assert 20 * 2**30 < large < 60 * 2**30  # the 0.5B LoRA row: tens of GiB, far below an H200's 141
