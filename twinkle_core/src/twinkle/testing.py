"""Helpers for testing plugins and components.

``registered_plugin`` registers an in-test plugin for the duration of a ``with`` block
and removes it (and everything it registered) afterwards::

    from twinkle.testing import registered_plugin

    class MyPlugin:
        @twinkle.hookimpl
        def twinkle_register_components(self, register):
            register("loss", "MyLoss", MyLoss)

    def test_my_loss():
        with registered_plugin(MyPlugin()) as runtime:
            assert runtime.registry.resolve("loss", "MyLoss") is MyLoss

The pytest plugin in :mod:`twinkle.testing_pytest` exposes the same as the
``twinkle_plugin`` fixture (``pytest -p twinkle.testing_pytest``, or it is auto-loaded
when twinkle-core is installed).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from twinkle.plugins import PluginSystem
from twinkle.runtime import Runtime, initialize


@contextlib.contextmanager
def registered_plugin(
    plugin: Any, name: str | None = None, *, mode: str = "local", **initialize_kwargs: Any
) -> Iterator[Runtime]:
    """Initialize a fresh runtime with ``plugin`` added, yield it, then tear both down.

    An installed entry point of the same name is blocked for the duration, so a plugin's
    own tests work whether or not the plugin is also pip-installed.
    """
    name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
    disabled = {n.strip() for n in os.environ.get("TWINKLE_DISABLE_PLUGINS", "").split(",") if n.strip()}
    system = PluginSystem(disabled=disabled | {name}).load()
    info = system.add_plugin(plugin, name=name)
    if info.error:
        raise RuntimeError(f"the in-test plugin {info.name!r} failed to register:\n{info.error}")
    runtime = initialize(mode=mode, plugins=system, **initialize_kwargs)
    try:
        yield runtime
    finally:
        runtime.shutdown()
        system.remove_plugin(info.name)
