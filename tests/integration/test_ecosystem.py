"""The ecosystem with real installs: official plugins listed, a third-party plugin installed and removed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "twinkle-plugin-example"
OFFICIAL = {
    "ray": "twinkle-ray",
    "vllm": "twinkle-vllm",
    "megatron": "twinkle-megatron",
    "rewards": "twinkle-rewards",
    "server": "twinkle-server",
}
#: Official plugins that add commands rather than components.
COMMANDS_ONLY = {"server"}


def installer() -> list[str]:
    uv = os.environ.get("TWINKLE_TEST_UV") or shutil.which("uv")
    if uv and os.path.exists(uv):
        return [uv, "pip", "--quiet"]
    return [sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check"]


def python(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWINKLE_")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_twinkle_plugins_lists_core_and_every_official_plugin():
    result = subprocess.run([sys.executable, "-m", "twinkle.cli", "plugins", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert plugins["core"]["distribution"] == "twinkle-core" and plugins["core"]["error"] is None
    for name, dist in OFFICIAL.items():
        assert plugins[name]["distribution"] == dist, f"{dist} is not installed or not discovered"
        assert plugins[name]["version"] and plugins[name]["error"] is None
        if name in COMMANDS_ONLY:
            assert "twinkle_register_commands" in plugins[name]["hooks"], f"{dist} registers no command"
        else:
            assert plugins[name]["components"], f"{dist} registered nothing"
    kinds = {(c["kind"], c["name"]) for p in plugins.values() for c in p["components"]}
    assert {("launcher", "ray"), ("sampler", "VLLMSampler"), ("model", "MegatronModel")} <= kinds


def test_twinkle_serve_comes_from_the_server_plugin():
    """The command is the plugin's (installed here without its fastapi/uvicorn/tinker: --help still works)."""
    result = subprocess.run(
        [sys.executable, "-m", "twinkle.cli", "serve", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--max-adapters" in result.stdout and "--state-dir" in result.stdout
    listed = python("from twinkle.commands import plugin_commands; print(plugin_commands()['serve'].plugin)")
    assert listed.stdout.strip() == "server", listed.stdout + listed.stderr
    blocked = subprocess.run(
        [sys.executable, "-m", "twinkle.cli", "serve"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TWINKLE_DISABLE_PLUGINS": "server"},
    )
    assert blocked.returncode == 1 and "installed but blocked" in blocked.stderr, blocked.stderr


RESOLVE_LOSS = """
import warnings, twinkle
warnings.simplefilter("ignore")
twinkle.initialize()
try:
    cls = twinkle.get_registry().resolve("loss", "LabelSmoothingLoss")
    print("OK", cls.__module__)
except LookupError as exc:
    print("ERR", exc)
"""


def test_installing_the_example_plugin_makes_its_loss_resolvable_and_uninstalling_removes_it():
    if python("import twinkle_example").returncode == 0:
        pytest.skip("twinkle-plugin-example is already installed in this environment")
    cmd = installer()
    subprocess.run(
        [*cmd, "install", "--python", sys.executable, "--no-deps", str(EXAMPLE)]
        if cmd[0].endswith("uv")
        else [*cmd, "install", "--no-deps", str(EXAMPLE)],
        check=True,
    )
    try:
        installed = python(RESOLVE_LOSS)
        assert installed.stdout.startswith("OK twinkle_example.loss"), installed.stdout + installed.stderr
    finally:
        subprocess.run(
            [*cmd, "uninstall", "--python", sys.executable, "twinkle-plugin-example"]
            if cmd[0].endswith("uv")
            else [*cmd, "uninstall", "-y", "twinkle-plugin-example"],
            check=True,
        )
    removed = python(RESOLVE_LOSS)
    assert removed.stdout.startswith("ERR No loss named 'LabelSmoothingLoss'"), removed.stdout + removed.stderr
    assert "Registered loss names:" in removed.stdout


def test_example_plugin_own_test_suite_passes(tmp_path):
    """The plugin author kit: the example project's tests pass against this core."""
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE / "src")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
