"""What a third-party plugin author hits: the test fixture, raising hooks, overrides, plugin selection, --check."""

from __future__ import annotations

import json
import textwrap
import warnings

import pytest
import twinkle
from twinkle.plugins import PluginHookWarning, PluginSystem
from twinkle.registry import ComponentOverrideWarning

from conftest import run_python, write_dist

FIXTURED = {
    "fixtured_plugin.py": """
        import twinkle

        @twinkle.hookimpl
        def twinkle_register_components(register):
            register("loss", "FixturedLoss", "fixtured_plugin:FixturedLoss")

        from twinkle.loss.base import Loss

        class FixturedLoss(Loss):
            pass
    """
}


def test_twinkle_plugin_fixture_works_when_the_plugin_is_installed_under_another_entry_point_name(tmp_path):
    """The plugin's module is `fixtured_plugin`, its installed entry point `fixtured-entry`."""
    site = tmp_path / "site"
    write_dist(site, "twinkle-fixtured", "1.0", {"fixtured-entry": "fixtured_plugin"}, FIXTURED)
    test_file = tmp_path / "test_fixtured.py"
    test_file.write_text(
        textwrap.dedent(
            """
            import fixtured_plugin

            def test_by_module_name(twinkle_plugin):
                runtime = twinkle_plugin(fixtured_plugin)
                assert runtime.registry.get("loss", "FixturedLoss").plugin == "fixtured_plugin"

            def test_by_entry_point_name(twinkle_plugin):
                runtime = twinkle_plugin(fixtured_plugin, name="fixtured-entry")
                assert runtime.registry.get("loss", "FixturedLoss").plugin == "fixtured-entry"

            def test_installed_alone():
                import twinkle
                registry = twinkle.initialize().registry
                assert registry.get("loss", "FixturedLoss").plugin == "fixtured-entry"
            """
        )
    )
    code = f"import sys, pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {str(test_file)!r}]))"
    result = run_python(code, site=site, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


class RaisingObserver:
    @twinkle.hookimpl
    def twinkle_runtime_started(self, runtime):
        raise RuntimeError("dashboard unreachable")

    @twinkle.hookimpl
    def twinkle_metrics_emitted(self, runtime, source, step, metrics):
        raise ValueError("bad metric sink")

    @twinkle.hookimpl
    def twinkle_runtime_stopped(self, runtime):
        raise RuntimeError("flush failed")


class Recorder:
    def __init__(self):
        self.metrics = []
        self.started = 0

    @twinkle.hookimpl
    def twinkle_runtime_started(self, runtime):
        self.started += 1

    @twinkle.hookimpl
    def twinkle_metrics_emitted(self, runtime, source, step, metrics):
        self.metrics.append((source, step, dict(metrics)))


def test_a_raising_lifecycle_hook_is_isolated_warned_once_and_named():
    system = PluginSystem().load()
    recorder = Recorder()
    # the recorder is registered first, so pluggy calls the raising plugin before it
    system.add_plugin(recorder, name="recorder")
    system.add_plugin(RaisingObserver(), name="raising-observer")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime = twinkle.initialize(plugins=system)
        runtime.emit_metrics("train", {"loss": 2.0}, step=1)
        runtime.emit_metrics("train", {"loss": 1.0}, step=2)
        runtime.shutdown()
    assert recorder.started == 1, "initialize() went on and the other plugin still saw the start"
    assert recorder.metrics == [("train", 1, {"loss": 2.0}), ("train", 2, {"loss": 1.0})]
    hook_warnings = [str(w.message) for w in caught if issubclass(w.category, PluginHookWarning)]
    assert len(hook_warnings) == 3, hook_warnings  # once per plugin and hook, not once per call
    assert all("'raising-observer'" in w for w in hook_warnings)
    assert any("twinkle_metrics_emitted" in w and "ValueError: bad metric sink" in w for w in hook_warnings)
    errors = system.plugins["raising-observer"].hook_errors
    assert errors["twinkle_runtime_started"] == "RuntimeError: dashboard unreachable"
    assert errors["twinkle_runtime_stopped"] == "RuntimeError: flush failed"
    assert twinkle.current_runtime() is None, "shutdown finished despite the raising hook"


def test_override_of_a_core_component_warns_once_naming_both_plugins():
    class Replacement:
        @twinkle.hookimpl
        def twinkle_register_components(self, register):
            register("optimizer", "AdamW", "collections:OrderedDict", override=True)

    with pytest.warns(ComponentOverrideWarning) as record:
        system = PluginSystem().load()
        system.add_plugin(Replacement(), name="adamw-replacer")
    messages = [str(w.message) for w in record if issubclass(w.category, ComponentOverrideWarning)]
    assert len(messages) == 1
    assert "'adamw-replacer'" in messages[0] and "'core'" in messages[0] and "'AdamW'" in messages[0]
    assert system.registry.get("optimizer", "AdamW").overrides == "core"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ComponentOverrideWarning)  # a second time in the process: silent
        PluginSystem().load().add_plugin(Replacement(), name="adamw-replacer")


GOOD = {
    "good_plugin.py": """
        import twinkle

        @twinkle.hookimpl
        def twinkle_register_components(register):
            register("loss", "GoodLoss", "good_plugin:GoodLoss")
            register("loss", "GhostLoss", "good_plugin:GhostLoss")  # no such class
            register("loss", "NeedsLib", "good_needs_lib:NeedsLib")

        from twinkle.loss.base import Loss

        class GoodLoss(Loss):
            pass
    """,
    "good_needs_lib.py": """
        import some_library_that_is_not_installed
    """,
}
FAKE_REWARDS = {
    "fake_rewards.py": """
        import twinkle

        @twinkle.hookimpl
        def twinkle_register_components(register):
            register("reward", "GSM8KAccuracyReward", "fake_rewards:reward")

        def reward(trajectories, **kwargs):
            return [0.0 for _ in trajectories]
    """
}


def make_site(tmp_path):
    site = tmp_path / "site"
    if not site.exists():
        write_dist(site, "twinkle-good", "1.0", {"good": "good_plugin"}, GOOD)
        write_dist(site, "twinkle-rewards", "9.9", {"rewards": "fake_rewards"}, FAKE_REWARDS)
    return site


SELECTION = """
    import json, twinkle
    try:
        rt = twinkle.initialize()
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
    else:
        print(json.dumps({
            "loaded": sorted(n for n, i in rt.plugins.plugins.items() if i.ok),
            "blocked": {n: i.blocked_by for n, i in rt.plugins.plugins.items() if i.blocked},
        }))
"""


def selection(tmp_path, **env):
    result = run_python(SELECTION, site=make_site(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_plugin_env_vars_accept_distribution_names(tmp_path):
    assert selection(tmp_path, TWINKLE_PLUGINS="twinkle-good")["loaded"] == ["core", "good"]
    assert selection(tmp_path, TWINKLE_PLUGINS="good,core")["loaded"] == ["core", "good"]
    blocked = selection(tmp_path, TWINKLE_DISABLE_PLUGINS="Twinkle_Good")
    assert blocked["loaded"] == ["core", "rewards"] and blocked["blocked"] == {"good": "TWINKLE_DISABLE_PLUGINS"}


def test_plugin_env_vars_reject_what_they_cannot_mean(tmp_path):
    disabled_core = selection(tmp_path, TWINKLE_DISABLE_PLUGINS="core")
    assert disabled_core["error"] == "PluginSelectionError" and "cannot be disabled" in disabled_core["message"]
    typo = selection(tmp_path, TWINKLE_PLUGINS="goood")
    assert typo["error"] == "PluginSelectionError"
    assert "'goood'" in typo["message"] and "good (twinkle-good)" in typo["message"]
    assert selection(tmp_path, TWINKLE_DISABLE_PLUGINS="twinkle-nope")["error"] == "PluginSelectionError"


def test_not_found_says_when_the_official_provider_is_installed_but_blocked(tmp_path):
    code = """
        import twinkle
        twinkle.initialize()
        try:
            twinkle.get_registry().resolve("reward", "GSM8KAccuracyReward")
        except LookupError as exc:
            print(exc)
    """
    result = run_python(code, site=make_site(tmp_path), env={"TWINKLE_DISABLE_PLUGINS": "twinkle-rewards"})
    assert "installed but blocked by TWINKLE_DISABLE_PLUGINS" in result.stdout, result.stdout + result.stderr
    assert "pip install" not in result.stdout


def test_cli_check_imports_every_target_and_reports_the_broken_ones(tmp_path):
    code = "import sys; from twinkle.cli import main; sys.exit(main(['plugins', '--check', '--json']))"
    result = run_python(code, site=make_site(tmp_path))
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    broken = {e["name"]: e for e in report["broken"]}
    assert set(broken) == {"GhostLoss"} and broken["GhostLoss"]["plugin"] == "good"
    assert "GhostLoss" in broken["GhostLoss"]["error"]
    unavailable = {e["name"]: e["error"] for e in report["unavailable"]}
    assert unavailable["NeedsLib"] == "needs 'some_library_that_is_not_installed', which is not installed"
    assert "GoodLoss" in {e["name"] for e in report["ok"]}
    human = run_python("from twinkle.cli import main; main(['plugins', '--check'])", site=make_site(tmp_path))
    assert "BROKEN  loss 'GhostLoss' (good, good_plugin:GhostLoss)" in human.stdout
    healthy = run_python(
        "import sys; from twinkle.cli import main; sys.exit(main(['plugins', '--check']))",
        site=make_site(tmp_path),
        env={"TWINKLE_DISABLE_PLUGINS": "good"},
    )
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert " 0 broken" in healthy.stdout


def test_cli_says_what_blocked_a_plugin(tmp_path):
    result = run_python(
        "from twinkle.cli import main; main(['plugins'])", site=make_site(tmp_path), env={"TWINKLE_PLUGINS": "rewards"}
    )
    assert "good  (twinkle-good 1.0, entry-point)  [blocked by TWINKLE_PLUGINS]" in result.stdout, result.stdout
