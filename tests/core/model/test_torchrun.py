"""torchrun: two CPU processes (gloo) with the same global batch give the same numbers as one.

The same worker script runs in this process (world size 1) and under
``torchrun --nproc_per_node 2``; dp maps to gradient all-reduce (DDP semantics), fsdp to
FSDP2 ``fully_shard``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
WORKER = HERE / "torchrun_worker.py"


def _run_in_process(out: Path, model_dir: str, layout: str, kind: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    import torchrun_worker

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sys, "argv", ["torchrun_worker.py", str(out), model_dir, layout, kind])
    torchrun_worker.main()
    return json.loads(out.read_text())


@pytest.mark.parametrize(("layout", "kind"), [("dp", "lora"), ("fsdp", "full")])
def test_two_processes_match_one(tiny_model_dir, tmp_path, monkeypatch, layout, kind):
    one = _run_in_process(tmp_path / "one.json", tiny_model_dir, layout, kind, monkeypatch)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        str(WORKER),
        str(tmp_path / "two.json"),
        tiny_model_dir,
        layout,
        kind,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert len(two["losses"]) == 6 and len(two["norms"]) == 3
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["norms"] == pytest.approx(one["norms"], rel=1e-4)
    assert two["metric_loss"] == pytest.approx(one["metric_loss"], rel=1e-5)
    saved = Path(two["saved"])
    weights = "adapter_model.safetensors" if kind == "lora" else "model.safetensors"
    assert (saved / weights).is_file() and (saved / "rng_state_1.pt").is_file()
