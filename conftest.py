"""Repository-wide test settings: the ``gpu`` marker, a scratch run directory for trackers.

Tests that need a CUDA GPU carry ``@pytest.mark.gpu``; on a machine without one (CI, this
CPU box) they are skipped with that reason. Area conftests hold only their own fixtures.

This file sits at the repository root, not in tests/: pytest puts a conftest's folder on
sys.path, and tests/ holds folders named ray/, vllm/ and megatron/ that would then import
as namespace packages where the real libraries are not installed.

Without an NVIDIA device, ``TRITON_INTERPRET=1`` is set here, before anything imports triton
(transformers and peft may at import): Triton kernels then run under Triton's interpreter on
CPU, so their tests check the kernel source CI cannot compile (tests/core/fastpath/test_triton_ce.py).
"""

from __future__ import annotations

import glob
import os
import tempfile

import pytest

if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Trackers (JSONL by default) write under the run directory once a metric is emitted: keep the
# runs of tests that do not pick their own out of the working tree (tests/**/test_tracking*.py do).
os.environ.setdefault("TWINKLE_RUN_DIR", tempfile.mkdtemp(prefix="twinkle-test-run-"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped where torch sees none)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu_items:
        item.add_marker(skip)
