"""Proxies: a component class's ``@remote`` methods, forwarded to a server-side object."""

from __future__ import annotations

from typing import Any, Iterable

from twinkle.client.codec import decode, encode
from twinkle.client.session import ClientSession
from twinkle.dispatch import RemoteSpec, remote_methods


class RemoteComponent:
    """Stands in for a component built on the server.

    Every method the component class marks with :func:`twinkle.dispatch.remote` becomes
    a method here that sends its arguments to the server and returns the server's result.
    Other attributes raise an :class:`AttributeError` that says they are not available in
    http mode.

    Args:
        session: the :class:`ClientSession`.
        cls: the component class (its remote metadata defines the methods).
        object_id: the server-side object's id.
        methods: further method names to forward (e.g. ``sync`` of a checkpoint engine).
    """

    def __init__(self, session: ClientSession, cls: type, object_id: str, methods: Iterable[str] = ()) -> None:
        self._session = session
        self._cls = cls
        self._object_id = object_id
        self._specs: dict[str, RemoteSpec | None] = {**dict.fromkeys(methods), **remote_methods(cls)}

    @property
    def remote_id(self) -> str:
        """The id of the object on the server."""
        return self._object_id

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._specs:
            raise AttributeError(
                f"{self._cls.__name__}.{name} is not available in http mode (only remote methods are: "
                f"{', '.join(sorted(self._specs))})"
            )

        def call(*args: Any, **kwargs: Any) -> Any:
            body = {"method": name, "args": encode(list(args)), "kwargs": encode(kwargs)}
            result = self._session.request("POST", f"/twinkle/v1/objects/{self._object_id}/call", json=body)
            value = decode(result["result"])
            if name == "calculate_metric" and isinstance(value, dict):
                _emit_locally(args, kwargs, value)
            return value

        call.__name__ = name
        call.__doc__ = getattr(getattr(self._cls, name, None), "__doc__", None)
        return call

    def __dir__(self) -> list[str]:
        return sorted(set(self._specs) | {"remote_id"})

    def __repr__(self) -> str:
        return f"<remote {self._cls.__name__} {self._object_id} at {self._session.base_url}>"

    def close(self) -> None:
        """Release the server-side object (and its adapters)."""
        self._session.request("DELETE", f"/twinkle/v1/objects/{self._object_id}")


def _emit_locally(args: tuple, kwargs: dict, metrics: dict) -> None:
    """A server-side model's metrics reach this process's trackers too (its run directory, its plugins)."""
    from twinkle.runtime import current_runtime

    runtime = current_runtime()
    if runtime is None:
        return
    is_training = kwargs.get("is_training", args[0] if args else True)
    source = "train" if is_training else "eval"
    if kwargs.get("adapter_name"):
        source = f"{source}/{kwargs['adapter_name']}"
    step = metrics.get("optimizer_step", metrics.get("step"))
    runtime.emit_metrics(source, metrics, step=step if isinstance(step, int) else None)
