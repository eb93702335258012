"""Every hook spec: a test that it is called, and a heading in docs/plugins.md (meta-tests)."""

from __future__ import annotations

import inspect
from pathlib import Path

import twinkle
from twinkle import hookspecs
from twinkle.testing import registered_plugin

REPO = Path(__file__).resolve().parents[2]
HOOKS = sorted(name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("twinkle_"))


class Recorder:
    def __init__(self):
        self.calls = []

    @twinkle.hookimpl
    def twinkle_register_components(self, register):
        self.calls.append("twinkle_register_components")
        register("optimizer", "RecordedOptimizer", "collections:Counter")

    @twinkle.hookimpl
    def twinkle_register_launchers(self, register):
        self.calls.append("twinkle_register_launchers")
        register("recorded", "twinkle.launcher.local:LocalLauncher")

    @twinkle.hookimpl
    def twinkle_register_commands(self, register):
        self.calls.append("twinkle_register_commands")
        register("recorded-cmd", lambda parser: parser.set_defaults(func=lambda args: 0), help="recorded")

    @twinkle.hookimpl
    def twinkle_runtime_started(self, runtime):
        self.calls.append("twinkle_runtime_started")

    @twinkle.hookimpl
    def twinkle_runtime_stopped(self, runtime):
        self.calls.append("twinkle_runtime_stopped")

    @twinkle.hookimpl
    def twinkle_component_created(self, runtime, kind, name, component):
        self.calls.append("twinkle_component_created")

    @twinkle.hookimpl
    def twinkle_metrics_emitted(self, runtime, source, step, metrics):
        self.calls.append(("twinkle_metrics_emitted", source, step, dict(metrics)))


def test_every_hook_is_called():
    recorder = Recorder()
    with registered_plugin(recorder, name="recorder", mode="recorded") as runtime:
        assert runtime.launcher.mode == "local"  # the launcher class registered as 'recorded'
        assert "RecordedOptimizer" in runtime.registry.names("optimizer")
        runtime.create("optimizer", "RecordedOptimizer")
        runtime.emit_metrics("test/model", {"loss": 1.5}, step=7)
        from twinkle.commands import plugin_commands

        assert plugin_commands(runtime.plugins)["recorded-cmd"].plugin == "recorder"
    names = {c if isinstance(c, str) else c[0] for c in recorder.calls}
    assert names == set(HOOKS)
    assert ("twinkle_metrics_emitted", "test/model", 7, {"loss": 1.5}) in recorder.calls
    assert recorder.calls.index("twinkle_runtime_started") < recorder.calls.index("twinkle_runtime_stopped")


def test_registered_plugin_removes_everything_it_added():
    """The same plugin system, checked after the block: its names, its hooks and its record are gone."""
    recorder = Recorder()
    with registered_plugin(recorder, name="recorder", mode="recorded") as runtime:
        system = runtime.plugins
        assert "RecordedOptimizer" in system.registry.names("optimizer")
        assert "recorded" in system.registry.names("launcher") and system.pm.has_plugin("recorder")
    assert "RecordedOptimizer" not in system.registry.names("optimizer")
    assert "recorded" not in system.registry.names("launcher")
    assert "recorder" not in system.plugins and not system.pm.has_plugin("recorder")
    calls = len(recorder.calls)
    system.notify("twinkle_metrics_emitted", runtime=runtime, source="train", step=1, metrics={"loss": 1.0})
    assert len(recorder.calls) == calls, "its lifecycle hooks are no longer called"
    assert twinkle.current_runtime() is None


def test_twinkle_plugin_fixture(twinkle_plugin):
    runtime = twinkle_plugin(Recorder(), name="recorder")
    assert "RecordedOptimizer" in runtime.registry.names("optimizer")


def test_every_hook_has_a_test():
    sources = "\n".join(p.read_text() for p in (REPO / "tests").rglob("test_*.py"))
    untested = [hook for hook in HOOKS if f"def {hook}(" not in sources]
    assert not untested, f"hooks without a test implementing them: {untested}"


def test_every_hook_is_documented():
    docs = (REPO / "docs" / "plugins.md").read_text()
    undocumented = [hook for hook in HOOKS if f"### `{hook}`" not in docs]
    assert not undocumented, f"hooks without a '### `name`' section in docs/plugins.md: {undocumented}"


def test_every_hook_has_a_typed_documented_spec():
    for hook in HOOKS:
        fn = getattr(hookspecs, hook)
        assert fn.__doc__ and "Args:" in fn.__doc__, hook
        assert all(p.annotation is not inspect.Parameter.empty for p in inspect.signature(fn).parameters.values())
