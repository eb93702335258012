"""http mode: models become proxies to objects hosted by ``twinkle serve``.

    twinkle.initialize(mode="http", base_url="http://127.0.0.1:8000", api_key="tml-...")
    model = TransformersModel(model_id="twinkle/tiny-qwen2")   # a proxy; same methods

Data components (datasets, data loaders, templates) and rewards stay local: they prepare
batches in the user's process and only the batches travel. Models, samplers and checkpoint
engines are built on the server: the server hosts the base model once and gives each
tenant's model its own adapters (or a private copy once it trains full parameters), each
sampler is private to its tenant, and ``engine.sync(model, sampler)`` runs on the server
with the proxies resolved to the tenant's own objects (no weights travel to the client).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

from twinkle.launcher.base import Launcher

#: Component base classes (module:attr) that http mode builds on the server.
REMOTE_KINDS = {
    "model": "twinkle.model.base:TwinkleModel",
    "sampler": "twinkle.sampler.base:Sampler",
    "checkpoint_engine": "twinkle.checkpoint_engine.base:CheckpointEngine",
}
#: Methods forwarded besides the class's ``@remote`` ones (checkpoint engines have none).
EXTRA_METHODS = {"checkpoint_engine": ("sync",)}
_local = threading.local()


@contextlib.contextmanager
def build_locally() -> Iterator[None]:
    """Inside this block (this thread), components are built here even in http mode (the server uses it)."""
    previous = getattr(_local, "active", False)
    _local.active = True
    try:
        yield
    finally:
        _local.active = previous


class HTTPLauncher(Launcher):
    """Builds models on a ``twinkle serve`` server.

    Options (``twinkle.initialize(mode='http', ...)``):
        base_url: the server, e.g. ``http://127.0.0.1:8000``.
        api_key: the tenant's API key.
        timeout: seconds a call may take (default 600).

    Raises:
        ValueError: a missing ``base_url`` or ``api_key``.
    """

    mode = "http"

    def __init__(self, runtime: Any, base_url: str = "", api_key: str = "", timeout: float = 600.0) -> None:
        super().__init__(runtime, base_url=base_url, api_key=api_key, timeout=timeout)
        from twinkle.client.session import ClientSession

        self.session = ClientSession(base_url, api_key, timeout)
        self._objects: list[Any] = []

    def start(self) -> None:
        """Check that the server answers and the key is valid."""
        self.session.request("GET", "/twinkle/v1/whoami")

    def _kind(self, cls: type) -> str | None:
        from twinkle._utils import import_target

        for kind, base in REMOTE_KINDS.items():
            try:
                if issubclass(cls, import_target(base)):
                    return kind
            except ImportError:
                continue
        return None

    def create(self, cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any | None:
        """A :class:`~twinkle.client.proxy.RemoteComponent` for models, samplers and checkpoint engines.

        Returns None (build here) for every other component.
        """
        if getattr(_local, "active", False):
            return None
        kind = self._kind(cls)
        if kind is None:
            return None
        from twinkle.client.codec import encode
        from twinkle.client.proxy import RemoteComponent

        kwargs = {k: v for k, v in kwargs.items() if k not in ("remote_group", "device_mesh")}
        body = {"kind": kind, "cls": cls.__name__, "args": encode(list(args)), "kwargs": encode(kwargs)}
        created = self.session.request("POST", "/twinkle/v1/objects", json=body)
        proxy = RemoteComponent(self.session, cls, created["object_id"], EXTRA_METHODS.get(kind, ()))
        self._objects.append(proxy)
        return proxy

    def shutdown(self) -> None:
        """Release the server-side objects of this run and close the connection."""
        from twinkle.client.session import ServerError

        for proxy in self._objects:
            with contextlib.suppress(ServerError, OSError):
                proxy.close()
        self._objects.clear()
        self.session.close()
