"""``benchmarks/async_rl.py`` runs end to end in local mode (a sampler process) and reports what it claims.

A staleness-0 run with the rollout correction is the benchmark's own check that the sampler and
the trainer agree: the sampler process's log-probabilities of its tokens are the trainer's (both
float32 on the CPU, the same weights after the sync), so the correction's KL reads ~0 and no
token is truncated. Its rewards equal the synchronous run's step for step (same seed, same
samples: the weights the sampler uses are the same).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[3] / "benchmarks" / "async_rl.py"


def _row(table: str, run: str) -> list[str]:
    [line] = [line for line in table.splitlines() if line.startswith(f"| {run} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_async_rl_benchmark_reports_agreement_at_staleness_zero(tmp_path: Path) -> None:
    out = tmp_path / "async_rl.md"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "--steps", "3", "--seeds", "0", "--runs", "sync,s0_tis,s1_plain"]
        + ["--window", "2", "--every", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    header = _row(table, "run")
    sync, s0_tis, s1_plain = (dict(zip(header, _row(table, name))) for name in ("sync", "s0_tis", "s1_plain"))
    # the sampler agrees with the trainer: KL ~0 (float32 noise is ~1e-12), nothing truncated
    assert float(s0_tis["rollout KL"]) < 1e-4, s0_tis
    assert float(s0_tis["tokens truncated / masked"]) == 0.0, s0_tis
    assert s0_tis["final reward (last 2)"] == sync["final reward (last 2)"]
    # staleness as configured: 0 for sync, about one update behind for s1 (the first batch is fresh)
    assert float(sync["mean staleness"]) == 0.0
    assert 0.3 <= float(s1_plain["mean staleness"]) <= 1.0, s1_plain
    for row in (sync, s0_tis, s1_plain):
        assert 0.0 <= float(row["final reward (last 2)"]) <= 1.0
