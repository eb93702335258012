"""initialize(): runtimes, modes as launchers, lifecycle."""

from __future__ import annotations

import pytest
import twinkle
from twinkle import DeviceGroup, DeviceMesh, MeshError
from twinkle.plugins import PluginSystem
from twinkle.registry import ComponentNotFoundError


def test_initialize_returns_current_runtime_and_shutdown_clears_it():
    runtime = twinkle.initialize(mode="local", seed=3)
    assert twinkle.current_runtime() is runtime
    assert runtime.mode == "local" and runtime.seed == 3
    assert runtime.launcher.mode == "local"
    runtime.shutdown()
    assert twinkle.current_runtime() is None
    runtime.shutdown()  # idempotent


def test_several_runtimes_in_one_process_nest_with_context_managers():
    with twinkle.initialize() as outer:
        with twinkle.initialize(groups=[DeviceGroup("a", 1, "cpu")]) as inner:
            assert twinkle.current_runtime() is inner
            assert inner.plugins is not outer.plugins, "each runtime owns its plugin system"
        assert twinkle.current_runtime() is outer
    assert twinkle.current_runtime() is None


def test_unknown_mode_names_installed_modes_and_the_plugin_that_provides_it():
    system = PluginSystem(disabled=["ray"])
    with pytest.raises(ComponentNotFoundError) as err:
        twinkle.initialize(mode="ray", plugins=system)
    message = str(err.value)
    assert "pip install twinkle-ray" in message and "http, local" in message
    with pytest.raises(ComponentNotFoundError, match="Did you mean: 'local'"):
        twinkle.initialize(mode="locall")


def test_groups_are_validated():
    with pytest.raises(MeshError, match="unique"):
        twinkle.initialize(groups=[DeviceGroup("a", 1, "cpu"), DeviceGroup("a", 2, "cpu")])
    with pytest.raises(MeshError, match="DeviceGroup objects"):
        twinkle.initialize(groups=["default"])


def test_local_mode_rejects_a_mesh_bigger_than_the_processes():
    mesh = DeviceMesh.from_sizes(fsdp_size=4, dp_size=2)
    with pytest.raises(MeshError, match="torchrun --nproc_per_node 8"):
        twinkle.initialize(global_device_mesh=mesh)
    assert twinkle.current_runtime() is None, "a failed initialize leaves nothing current"


def test_local_mode_checks_remote_group_names():
    from twinkle.component import Component

    class Thing(Component):
        def __init__(self, remote_group=None):
            self.remote_group = remote_group

    with twinkle.initialize(groups=[DeviceGroup("default", 1, "cpu")]):
        assert Thing(remote_group="default").remote_group == "default"
        with pytest.raises(MeshError, match="declared groups: default"):
            Thing(remote_group="sampler")


def test_create_resolves_and_reports_component_creation():
    created = []

    class Watcher:
        @twinkle.hookimpl
        def twinkle_component_created(self, runtime, kind, name, component):
            created.append((kind, name, type(component).__name__))

    system = PluginSystem().load()
    system.add_plugin(Watcher(), name="watcher")
    with twinkle.initialize(plugins=system) as runtime:

        class Fake:
            pass

        runtime.registry.register("lr_scheduler", "Fake", Fake, plugin="test")
        obj = runtime.create("lr_scheduler", "Fake")
    assert isinstance(obj, Fake)
    assert created == [("lr_scheduler", "Fake", "Fake")]
