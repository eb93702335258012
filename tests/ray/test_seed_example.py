"""The seed's Ray example runs unchanged on a local CPU cluster: 8 actors, fsdp=4 x dp=2."""

from __future__ import annotations

import math
import os
import runpy

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_seed_ray_example_runs_on_cpu_actors(ray_cluster, tmp_path, monkeypatch, capsys):
    import twinkle

    checkpoint = tmp_path / "last-checkpoint"
    monkeypatch.setenv("TWINKLE_SEED_ROWS", "8")  # one global batch of 8
    monkeypatch.setenv("TWINKLE_CHECKPOINT_DIR", str(checkpoint))
    try:
        module = runpy.run_path(os.path.join(HERE, "seed_ray_example.py"), run_name="__main__")
        runtime = twinkle.get_runtime()
        assert runtime.mode == "ray"
        (component,) = runtime.launcher.components
        assert component.mesh.describe() == "DeviceMesh(dp=2, fsdp=4)"
        assert len(set(component.pids)) == 8  # eight actor processes
    finally:
        twinkle.shutdown()
    out = capsys.readouterr().out
    assert "Current is step 0 of 1, metric:" in out
    assert module["ROWS"] == 8
    line = next(line for line in out.splitlines() if line.startswith("Current is step 0"))
    assert "loss" in line
    loss = float(line.split("'loss': ")[1].split(",")[0].rstrip("}"))
    assert math.isfinite(loss) and loss > 0
    assert checkpoint.is_dir() and any(checkpoint.iterdir())
