"""Fixtures for the torch-free plugin-system tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_current_runtime(tmp_path):
    """Every test starts and ends with no current runtime and no plugin env vars (the run
    directory of trackers is the test's own)."""
    import twinkle.runtime as rt

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("TWINKLE_")}
    os.environ["TWINKLE_RUN_DIR"] = str(tmp_path / "run")
    rt.shutdown()
    rt.reset_default_plugins()
    yield
    while rt.current_runtime() is not None:
        rt.shutdown()
    rt.reset_default_plugins()
    os.environ.pop("TWINKLE_RUN_DIR", None)
    os.environ.update(saved)


def write_dist(site: Path, dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """Lay out an installed distribution (dist-info + modules) the way pip does, under ``site``."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = ["[twinkle]"] + [f"{name} = {target}" for name, target in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for relpath, source in modules.items():
        path = site / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))


def run_python(
    code: str, *, site: Path | None = None, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (with ``site`` on sys.path)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TWINKLE_")}
    if site is not None:
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), full_env.get("PYTHONPATH", "")]))
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=120,
    )
