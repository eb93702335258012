"""examples/sft_self_cognition.py in ray mode gives the losses and the answer of local mode.

The example builds its runtime with ``twinkle.initialize(mode="local", groups=...)``; this
test runs it unchanged, once as written and once with that one call switched to
``mode="ray"`` (same groups, CPU), so its ``TransformersModel(remote_group="default")``
becomes a Ray actor behind a proxy while the Dataset and DataLoader stay in the driver.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("tqdm")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ARGS = ["--device", "cpu", "--rows", "32"]  # 4 global batches of 8


def run_example(tmp_path, monkeypatch, mode: str) -> dict:
    import twinkle
    from twinkle.runtime import get_runtime, initialize
    from twinkle.runtime import shutdown as real_shutdown

    def initialize_in_mode(*args, **kwargs):
        kwargs.pop("mode", None)
        return initialize(mode, *args[1:], **kwargs)

    example = pytest.importorskip("sft_self_cognition")
    workdir = tmp_path / mode
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(twinkle, "initialize", initialize_in_mode)
    seen = {}

    def shutdown_and_record():
        runtime = get_runtime()
        seen["mode"] = runtime.mode
        seen["components"] = len(getattr(runtime.launcher, "components", []))
        real_shutdown()

    monkeypatch.setattr(twinkle, "shutdown", shutdown_and_record)
    try:
        result = example.train(example.parse_args([*ARGS, "--output", str(workdir / "checkpoint")]))
    finally:
        real_shutdown()  # no-op when the example shut down itself
    assert (workdir / "checkpoint").is_dir()
    return {**result, **seen}


def test_sft_example_in_ray_mode_matches_local(ray_cluster, tmp_path, monkeypatch):
    if not (EXAMPLES / "sft_self_cognition.py").is_file():
        pytest.skip("examples/sft_self_cognition.py is not in this checkout")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    local = run_example(tmp_path, monkeypatch, "local")
    ray = run_example(tmp_path, monkeypatch, "ray")
    assert (local["mode"], ray["mode"]) == ("local", "ray")
    assert ray["components"] == 1  # the model ran in an actor
    assert ray["first_loss"] == pytest.approx(local["first_loss"], rel=1e-4)
    assert ray["last_loss"] == pytest.approx(local["last_loss"], rel=1e-4)
    assert ray["answer"] == local["answer"]
