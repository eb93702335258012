"""Twinkle: a component library for training large language models.

Importing ``twinkle`` is cheap: no torch, transformers, ray or vllm, no files written.
Everything below is loaded on first use (PEP 562)::

    import twinkle
    from twinkle import DeviceGroup, DeviceMesh

    twinkle.initialize(mode="local", seed=0)

Writing a plugin: implement hooks from :mod:`twinkle.hookspecs` with ``@twinkle.hookimpl``
and list the module under the ``twinkle`` entry-point group; see ``docs/plugins.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from twinkle.hookspecs import hookimpl as hookimpl

__version__ = "0.1.0"

_LAZY = {
    "hookimpl": "twinkle.hookspecs:hookimpl",  # pluggy is two thirds of a bare import's time
    "initialize": "twinkle.runtime:initialize",
    "shutdown": "twinkle.runtime:shutdown",
    "get_runtime": "twinkle.runtime:get_runtime",
    "current_runtime": "twinkle.runtime:current_runtime",
    "get_registry": "twinkle.runtime:get_registry",
    "log_metrics": "twinkle.runtime:log_metrics",
    "Runtime": "twinkle.runtime:Runtime",
    "DeviceGroup": "twinkle.mesh:DeviceGroup",
    "DeviceMesh": "twinkle.mesh:DeviceMesh",
    "MeshError": "twinkle.mesh:MeshError",
    "Component": "twinkle.component:Component",
    "remote": "twinkle.dispatch:remote",
    "PluginSystem": "twinkle.plugins:PluginSystem",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'twinkle' has no attribute {name!r}")
    from twinkle._utils import import_target

    value = import_target(target)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
