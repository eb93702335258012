"""Plugin discovery through real entry points (dist-info on sys.path, as pip lays it out)."""

from __future__ import annotations

import json

from conftest import run_python, write_dist

GOOD = {
    "good_plugin.py": """
        import twinkle

        @twinkle.hookimpl
        def twinkle_register_components(register):
            register("loss", "GoodLoss", "good_plugin:GoodLoss")

        class GoodLoss:
            pass
    """
}
BROKEN = {
    "broken_plugin.py": """
        import twinkle
        raise ImportError("this plugin needs libfoo, which is not installed")
    """
}
RAISING = {
    "raising_plugin.py": """
        import twinkle

        @twinkle.hookimpl
        def twinkle_register_components(register):
            register("loss", "HalfLoss", "raising_plugin:HalfLoss")
            raise RuntimeError("registration blew up")
    """
}


def make_site(tmp_path):
    site = tmp_path / "site"
    if site.exists():
        return site
    write_dist(site, "twinkle-good", "1.2.3", {"good": "good_plugin"}, GOOD)
    write_dist(site, "twinkle-broken", "0.0.1", {"broken": "broken_plugin"}, BROKEN)
    write_dist(site, "twinkle-raising", "0.0.2", {"raising": "raising_plugin"}, RAISING)
    return site


REPORT = """
    import json, warnings, twinkle
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rt = twinkle.initialize()
    plugins = {n: i for n, i in rt.plugins.plugins.items()}
    print(json.dumps({
        "loss": rt.registry.names("loss"),
        "ok": sorted(n for n, i in plugins.items() if i.ok),
        "failed": {n: i.error_summary for n, i in plugins.items() if i.error},
        "blocked": sorted(n for n, i in plugins.items() if i.blocked),
        "warnings": [str(w.message) for w in caught],
        "good_version": plugins["good"].version if "good" in plugins else None,
    }))
"""


def load_report(tmp_path, env=None):
    result = run_python(REPORT, site=make_site(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_entry_point_plugin_registers_and_broken_ones_are_isolated(tmp_path):
    report = load_report(tmp_path)
    assert "GoodLoss" in report["loss"]
    assert "HalfLoss" not in report["loss"], "a plugin whose hook raised must leave nothing half-registered"
    assert report["good_version"] == "1.2.3"
    assert "core" in report["ok"] and "good" in report["ok"]
    assert report["failed"]["broken"] == "ImportError: this plugin needs libfoo, which is not installed"
    assert report["failed"]["raising"] == "RuntimeError: registration blew up"
    assert any("'broken'" in w and "failed to load" in w for w in report["warnings"])


def test_using_a_name_after_its_plugin_failed_explains_why(tmp_path):
    code = """
        import twinkle, warnings
        warnings.simplefilter("ignore")
        twinkle.initialize()
        try:
            twinkle.get_registry().resolve("loss", "HalfLoss")
        except LookupError as exc:
            print(exc)
    """
    result = run_python(code, site=make_site(tmp_path))
    assert "No loss named 'HalfLoss'" in result.stdout
    assert "raising: RuntimeError: registration blew up" in result.stdout


def test_only_and_disable_env_vars(tmp_path):
    only = load_report(tmp_path, env={"TWINKLE_PLUGINS": "good"})
    assert only["failed"] == {} and "broken" in only["blocked"] and "good" in only["ok"]
    disabled = load_report(tmp_path, env={"TWINKLE_DISABLE_PLUGINS": "good,broken,raising"})
    assert "GoodLoss" not in disabled["loss"]
    assert disabled["failed"] == {}
    assert "core" in disabled["ok"], "core cannot be disabled"


def test_trace_env_var_prints_hook_calls(tmp_path):
    code = """
        import twinkle, warnings
        warnings.simplefilter("ignore")
        twinkle.initialize().shutdown()
    """
    result = run_python(code, site=make_site(tmp_path), env={"TWINKLE_TRACE_PLUGINS": "1"})
    assert "[twinkle trace] twinkle_register_components [plugin good]" in result.stderr
    assert "twinkle_runtime_started" in result.stderr and "twinkle_runtime_stopped" in result.stderr


def test_loading_is_lazy_and_idempotent():
    from twinkle.plugins import PluginSystem

    system = PluginSystem()
    assert not system.loaded and system.registry.names("optimizer") == []
    system.load()
    names = system.registry.names("optimizer")
    assert "AdamW" in names
    system.load()
    assert system.registry.names("optimizer") == names


def test_registry_use_without_initialize_loads_plugins_lazily():
    import twinkle
    from twinkle.launcher import LocalLauncher
    from twinkle.preprocessor import Filter, Preprocessor  # noqa: F401 - fixed exports resolve lazily

    assert twinkle.get_registry().resolve("launcher", "local") is LocalLauncher
    assert twinkle.current_runtime() is None
    assert "AdamW" in twinkle.get_registry().names("optimizer")


def test_cli_lists_plugins_and_errors_as_json(tmp_path):
    result = run_python("from twinkle.cli import main; main(['plugins', '--json'])", site=make_site(tmp_path))
    assert result.returncode == 0, result.stderr
    report = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert report["core"]["distribution"] == "twinkle-core"
    assert "twinkle_register_components" in report["core"]["hooks"]
    assert {c["name"] for c in report["good"]["components"]} == {"GoodLoss"}
    assert report["good"]["distribution"] == "twinkle-good" and report["good"]["version"] == "1.2.3"
    assert "libfoo" in report["broken"]["error"] and "Traceback" in report["broken"]["error"]


def test_cli_human_output(tmp_path):
    result = run_python("from twinkle.cli import main; main(['plugins'])", site=make_site(tmp_path))
    assert "good  (twinkle-good 1.2.3, entry-point)  [ok]" in result.stdout
    assert "broken  (twinkle-broken 0.0.1, entry-point)  [FAILED]" in result.stdout
    assert "loss: GoodLoss" in result.stdout
