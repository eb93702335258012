"""``benchmarks/service_engine.py --profile``: one configuration's step split and op tables, on CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        spec = importlib.util.spec_from_file_location("service_engine", BENCHMARKS / "service_engine.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def test_profile_reports_the_split_and_the_top_ops(bench):
    shape = dict(bench.TINY, num_hidden_layers=1)
    report = bench.profile("multi_8x1", shape, "cpu", rows=8, seq=8, steps=1, warmup=0, top=5, python=4)
    assert "8 adapter(s), 8 rows, 64 tokens" in report
    assert "forward+backward" in report and "optimizer" in report
    assert "(no device kernels: CPU run)" in report
    ops, python = report.split("### top 4 Python functions")
    cpu_rows = [line for line in ops.splitlines() if line.startswith("| `")]
    assert len(cpu_rows) == 5
    assert any("aten::" in line for line in cpu_rows)
    py_rows = [line for line in python.splitlines() if line.startswith("| `")]
    assert len(py_rows) == 4
    shares = [float(line.split("|")[4].strip().rstrip("%")) for line in py_rows]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.0
