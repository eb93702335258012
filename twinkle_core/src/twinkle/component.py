"""The base of every component that can be placed on a DeviceGroup.

``Component.__new__`` asks the current runtime's launcher whether to build the object
here or somewhere else. In local mode it is built here, as usual. In ray mode a
component created with ``remote_group='name'`` becomes a proxy to actors on that group;
in http mode, a proxy to a server-side object. User code is the same in every mode.
"""

from __future__ import annotations

from typing import Any


class Component:
    """Base class of placeable components (models, samplers, datasets, data loaders...).

    Subclasses accept ``remote_group`` and ``device_mesh`` keyword arguments in
    ``__init__`` (they may ignore them) and mark their public methods with
    :func:`twinkle.dispatch.remote`.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from twinkle.runtime import current_runtime

        runtime = current_runtime()
        if runtime is not None:
            proxy = runtime.launcher.create(cls, args, kwargs)
            if proxy is not None:
                return proxy
        return super().__new__(cls)
