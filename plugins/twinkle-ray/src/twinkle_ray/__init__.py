"""Twinkle plugin: ``mode='ray'`` runs components as Ray actors on DeviceGroups.

Install it next to twinkle-core and the user's loop runs on a Ray cluster unchanged::

    import twinkle
    from twinkle import DeviceGroup, DeviceMesh

    twinkle.initialize(mode="ray", groups=[DeviceGroup(name="default", ranks=2, device_type="cpu")],
                       global_device_mesh=DeviceMesh.from_sizes(dp_size=2), seed=42)
    model = TransformersModel(model_id=path, remote_group="default")   # two actors behind a proxy

Importing this package is cheap; Ray is imported when the launcher is first used. See
docs/ray.md for the launcher's options, results kept remote, iterators and failures.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "RayLauncher": "twinkle_ray.launcher:RayLauncher",
    "ComponentProxy": "twinkle_ray.proxy:ComponentProxy",
    "RemoteComponent": "twinkle_ray.proxy:RemoteComponent",
    "RemoteResult": "twinkle_ray.proxy:RemoteResult",
    "RemoteIterator": "twinkle_ray.proxy:RemoteIterator",
    "remote_component": "twinkle_ray.proxy:remote_component",
    "RayLauncherError": "twinkle_ray.errors:RayLauncherError",
    "RemoteComponentDied": "twinkle_ray.errors:RemoteComponentDied",
    "RemoteCallTimeout": "twinkle_ray.errors:RemoteCallTimeout",
    "PlacementError": "twinkle_ray.errors:PlacementError",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'twinkle_ray' has no attribute {name!r}")
    import importlib

    module, attr = target.split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
