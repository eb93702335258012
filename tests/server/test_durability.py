"""SIGKILL the server mid-run and restart it: checkpoints, metadata and other tenants survive."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

BASE = "twinkle/tiny-qwen2"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from twinkle.cli import main; sys.exit(main())", *args]


def _start(state_dir: Path) -> tuple[subprocess.Popen, str]:
    port_file = state_dir / "port"
    port_file.unlink(missing_ok=True)
    log = open(state_dir / "server.log", "ab")
    proc = subprocess.Popen(
        _cli(
            "serve", "--state-dir", str(state_dir), "--port", "0", "--port-file", str(port_file), "--max-adapters", "6"
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError((state_dir / "server.log").read_text()[-3000:])
        time.sleep(0.2)
    return proc, f"http://127.0.0.1:{port_file.read_text().strip()}"


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": np.array(tokens[1:])}
    )


def _steps(client, data, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        losses.append(client.forward_backward(data, "cross_entropy").result().metrics["loss:sum"])
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return losses


def test_sigkill_restart_keeps_checkpoints_and_resume_is_exact(tmp_path: Path) -> None:
    key_a = subprocess.run(
        _cli("serve", "--state-dir", str(tmp_path), "--add-tenant", "alice"), capture_output=True, text=True, check=True
    ).stdout.strip()
    key_b = subprocess.run(
        _cli("serve", "--state-dir", str(tmp_path), "--add-tenant", "bob"), capture_output=True, text=True, check=True
    ).stdout.strip()
    assert key_a.startswith("tml-") and key_b.startswith("tml-")
    data = [_datum(list(range(3, 40)))]
    proc, url = _start(tmp_path)
    try:
        alice = tinker.ServiceClient(base_url=url, api_key=key_a)
        bob = tinker.ServiceClient(base_url=url, api_key=key_b)
        run_a = alice.create_lora_training_client(base_model=BASE, rank=4).result()
        _steps(run_a, data, 2)
        path_a = run_a.save_state("after-2").result().path
        run_b = bob.create_lora_training_client(base_model=BASE, rank=4).result()
        _steps(run_b, data, 1)
        path_b = run_b.save_state("bob-1").result().path
        reference = _steps(alice.create_training_client_from_state_with_optimizer(path_a).result(), data, 2)
        # a request in flight when the server dies
        with httpx.Client(base_url=url, headers={"X-API-Key": key_a}) as http:
            sid = http.post("/api/v1/create_session", json={"tags": [], "sdk_version": "t"}).json()["session_id"]
            pending = http.post(
                "/api/v1/asample",
                json={
                    "prompt": {"chunks": [{"tokens": [1, 2, 3]}]},
                    "sampling_params": {"max_tokens": 800},
                    "base_model": BASE,
                },
            ).json()["request_id"]
        assert sid
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    proc, url = _start(tmp_path)
    try:
        alice = tinker.ServiceClient(base_url=url, api_key=key_a)
        rest_a = tinker.RestClient(base_url=url, api_key=key_a)
        assert [c.tinker_path for c in rest_a.list_checkpoints(run_a.model_id).result().checkpoints] == [path_a]
        resumed = alice.create_training_client_from_state_with_optimizer(path_a).result()
        np.testing.assert_allclose(_steps(resumed, data, 2), reference, rtol=1e-4)
        with httpx.Client(base_url=url, headers={"X-API-Key": key_a}) as http:
            lost = http.post("/api/v1/retrieve_future", json={"request_id": pending}).json()
            assert lost["category"] == "server" and "restarted" in lost["error"]
            stale = http.post("/api/v1/optim_step", json={"model_id": run_a.model_id, "adam_params": {}}).json()
            failed = http.post("/api/v1/retrieve_future", json={"request_id": stale["request_id"]}).json()
            assert "no longer in memory" in failed["error"]
        bob = tinker.ServiceClient(base_url=url, api_key=key_b)
        rest_b = tinker.RestClient(base_url=url, api_key=key_b)
        assert [c.tinker_path for c in rest_b.list_checkpoints(run_b.model_id).result().checkpoints] == [path_b]
        assert {r.training_run_id for r in rest_b.list_training_runs().result().training_runs} == {run_b.model_id}
        bob.create_training_client_from_state_with_optimizer(path_b).result()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_interrupted_checkpoint_writes_recover(tmp_path: Path) -> None:
    from twinkle_server import checkpoints as ckpt

    run = tmp_path / "tenant-x" / "run-1" / "training"
    good = run / "kept"
    with ckpt.atomic_directory(good) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with ckpt.atomic_directory(good) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("crash while writing")
    assert (good / "weights").read_text() == "v1"
    assert [p.name for p in run.iterdir()] == ["kept"]
    # a crash between the two renames of an overwrite: only the old copy remains, renamed away
    (run / ".old-swapped-abc123").mkdir()
    (run / ".old-swapped-abc123" / "weights").write_text("old")
    (run / ".tmp-partial-def456").mkdir()
    ckpt.recover(tmp_path)
    assert (run / "swapped" / "weights").read_text() == "old"
    assert sorted(p.name for p in run.iterdir()) == ["kept", "swapped"]
