"""Trackers: the ``tracker`` kind, the run directory, JSONL by default, selection by name or env."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import twinkle
from twinkle.registry import ComponentNotFoundError, InvalidComponentError
from twinkle.testing import registered_plugin
from twinkle.tracker import JsonlTracker, Tracker, read_metrics
from twinkle.tracker.runs import resolve_run_dir, tracker_names


class ListTracker(Tracker):
    instances: list = []

    def __init__(self, run_dir, tag="x", **options):
        super().__init__(run_dir, **options)
        self.tag, self.logged, self.closed = tag, [], False
        ListTracker.instances.append(self)

    def log(self, source, step, metrics):
        self.logged.append((source, step, dict(metrics)))

    def close(self):
        self.closed = True


class Plugin:
    @twinkle.hookimpl
    def twinkle_register_components(self, register):
        register("tracker", "listing", ListTracker)
        register("tracker", "not_a_tracker", "collections:Counter")


def test_jsonl_is_on_by_default_and_written_only_when_metrics_come(tmp_path):
    run_dir = tmp_path / "run1"
    with twinkle.initialize(run_dir=run_dir) as runtime:
        assert [type(t) for t in runtime.trackers] == [JsonlTracker]
        assert not run_dir.exists()  # nothing reported yet: no directory
        runtime.emit_metrics("train", {"loss": 2.5, "lr": 1e-4, "optimizer_step": 1, "note": "warm"}, step=1)
        twinkle.log_metrics({"reward": 0.25, "kl": 0.01}, step=1, source="rl")
        # flushed per line: readable while the run goes on
        assert len(read_metrics(run_dir)) == 2
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [(r["source"], r["step"]) for r in records] == [("train", 1), ("rl", 1)]
    assert records[0]["metrics"] == {"loss": 2.5, "lr": 1e-4, "optimizer_step": 1, "note": "warm"}
    assert isinstance(records[0]["metrics"]["optimizer_step"], int)
    assert records[1]["metrics"] == {"reward": 0.25, "kl": 0.01}
    assert records[0]["time"] <= records[1]["time"]


def test_run_dir_from_env_and_default_timestamp(tmp_path, monkeypatch):
    monkeypatch.setenv("TWINKLE_RUN_DIR", str(tmp_path / "from-env"))
    assert resolve_run_dir() == tmp_path / "from-env"
    assert resolve_run_dir(tmp_path / "arg") == tmp_path / "arg"  # the argument wins
    monkeypatch.delenv("TWINKLE_RUN_DIR")
    monkeypatch.chdir(tmp_path)
    first = resolve_run_dir()
    assert first.parent == tmp_path / "twinkle_runs" and first.name[:8].isdigit()
    first.mkdir(parents=True)
    second = resolve_run_dir()  # the same second: a suffix keeps runs apart
    assert second != first and second.parent == first.parent


def test_tracker_selection_by_argument_and_env(monkeypatch):
    assert tracker_names() == ["jsonl"]
    monkeypatch.setenv("TWINKLE_TRACKERS", "jsonl, tensorboard")
    assert tracker_names() == ["jsonl", "tensorboard"]
    assert tracker_names(["wandb"]) == ["wandb"]  # the argument wins
    monkeypatch.setenv("TWINKLE_TRACKERS", "none")
    assert tracker_names() == []
    assert tracker_names([]) == []


def test_a_plugin_tracker_gets_every_emission_and_is_closed(tmp_path):
    ListTracker.instances.clear()
    options = dict(run_dir=tmp_path, trackers=["listing", "jsonl"], tracker_options={"listing": {"tag": "t1"}})
    with registered_plugin(Plugin(), name="trackers-test", **options) as runtime:
        assert "listing" in runtime.registry.names("tracker")
        tracker = ListTracker.instances[-1]
        assert tracker.tag == "t1" and tracker.run_dir == tmp_path
        runtime.emit_metrics("train/default", {"loss": 1.0}, step=3)
    assert tracker.logged == [("train/default", 3, {"loss": 1.0})]
    assert tracker.closed
    assert read_metrics(tmp_path)[0]["source"] == "train/default"


def test_tracker_objects_and_off(tmp_path):
    mine = ListTracker(tmp_path)
    with twinkle.initialize(run_dir=tmp_path / "r", trackers=[mine]) as runtime:
        runtime.emit_metrics("eval", {"loss": 0.5}, step=None)
    assert mine.logged == [("eval", None, {"loss": 0.5})] and mine.closed
    assert not (tmp_path / "r").exists()
    with twinkle.initialize(run_dir=tmp_path / "off", trackers=[]) as runtime:
        runtime.emit_metrics("train", {"loss": 0.5}, step=1)
    assert not (tmp_path / "off").exists()


def test_unknown_and_invalid_tracker_names(tmp_path):
    with pytest.raises(ComponentNotFoundError) as info:
        twinkle.initialize(run_dir=tmp_path, trackers=["jsonll"])
    assert "jsonl" in str(info.value) and "tensorboard" in str(info.value)
    with pytest.raises(InvalidComponentError, match="twinkle.tracker.base.Tracker"):
        with registered_plugin(Plugin(), name="trackers-test", run_dir=tmp_path, trackers=["not_a_tracker"]):
            pass


def test_a_failing_tracker_warns_once_and_training_goes_on(tmp_path):
    class Broken(Tracker):
        def log(self, source, step, metrics):
            raise OSError("disk full")

    with twinkle.initialize(run_dir=tmp_path, trackers=[Broken(tmp_path), "jsonl"]) as runtime:
        with pytest.warns(RuntimeWarning, match="disk full"):
            runtime.emit_metrics("train", {"loss": 1.0}, step=1)
        runtime.emit_metrics("train", {"loss": 0.5}, step=2)  # no second warning: it is off
        assert [type(t) for t in runtime.trackers] == [JsonlTracker]
    assert [r["metrics"]["loss"] for r in read_metrics(tmp_path)] == [1.0, 0.5]


def test_only_rank_zero_tracks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with twinkle.initialize(run_dir=tmp_path) as runtime:
        assert runtime.trackers == []


def test_missing_library_names_its_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ImportError, match="pip install wandb"):
        twinkle.initialize(run_dir=tmp_path, trackers=["wandb"])


def test_jsonl_values_are_plain_json(tmp_path):
    class Scalar:  # numpy/torch-like 0-d value
        ndim = 0

        def item(self):
            return 0.5

    tracker = JsonlTracker(tmp_path)
    tracker.log("train", 1, {"a": Scalar(), "b": True, "c": [1, 2], "d": float("nan")})
    tracker.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["metrics"]["a"] == 0.5 and line["metrics"]["b"] is True and line["metrics"]["c"] == "[1, 2]"
    assert line["metrics"]["d"] != line["metrics"]["d"]  # NaN survives the round trip
    assert os.path.getsize(tmp_path / "metrics.jsonl") > 0


def test_import_twinkle_tracker_stays_light():
    import subprocess
    import sys

    code = (
        "import sys, twinkle.tracker, twinkle.tracker.runs, twinkle.tracker.hooks; "
        "print(sorted(m for m in ('torch', 'wandb', 'mlflow', 'tensorboard') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert Path(twinkle.tracker.__file__).exists()


def test_http_client_metrics_reach_the_local_trackers(tmp_path):
    """In http mode calculate_metric runs on the server; its result is tracked in the client's run too."""
    from twinkle.client.codec import encode
    from twinkle.client.proxy import RemoteComponent
    from twinkle.dispatch import remote

    class Model:
        @remote(dispatch="all", collect="first")
        def calculate_metric(self, is_training=True, *, adapter_name=None):
            """server side"""

    class Session:
        base_url = "http://server"

        def request(self, method, path, json=None):
            return {"result": encode({"step": 4, "optimizer_step": 4, "micro_batches": 8, "loss": 1.25})}

    with twinkle.initialize(run_dir=tmp_path) as _runtime:
        proxy = RemoteComponent(Session(), Model, "obj-1")
        assert proxy.calculate_metric(is_training=True, adapter_name="tenant")["loss"] == 1.25
        proxy.calculate_metric(False)
    records = read_metrics(tmp_path)
    assert [(r["source"], r["step"]) for r in records] == [("train/tenant", 4), ("eval", 4)]
    assert records[0]["metrics"]["micro_batches"] == 8
