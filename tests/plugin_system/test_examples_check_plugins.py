"""Examples that need a plugin stop at once, with the install command, when it is missing (issue 33.2).

This session installs twinkle-core alone (no torch, no plugins): an example that got past its
check would die on `import torch` with a traceback instead.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NEEDS = {
    "grpo.py": ["twinkle-rewards"],
    "grpo_vllm.py": ["twinkle-vllm", "twinkle-rewards"],
}


@pytest.mark.parametrize("example", sorted(NEEDS))
def test_example_without_its_plugins_fails_fast_with_the_install_command(example):
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / example)], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"{example} cannot run: ")
    for distribution in NEEDS[example]:
        assert (
            f"pip install ./plugins/{distribution} (this checkout; from a package index: pip install {distribution})"
            in (result.stderr)
        )
    assert elapsed < 10, f"took {elapsed:.1f}s: the check must come before torch loads"  # ~0.5 s; a busy CI box


def test_readme_says_which_example_needs_which_plugin():
    readme = (REPO / "README.md").read_text()
    for example, distributions in NEEDS.items():
        line = next((ln for ln in readme.splitlines() if f"examples/{example}" in ln and "needs" in ln), "")
        assert line and all(d in line for d in distributions), (example, line)
