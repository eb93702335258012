"""The Launcher protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from twinkle.runtime import Runtime


class Launcher:
    """Places components for one run mode.

    A launcher is created by :func:`twinkle.initialize` with the runtime and the mode's
    options (the keyword arguments ``initialize`` did not consume itself).

    Subclasses override :meth:`start`, :meth:`create` and :meth:`shutdown`.
    """

    #: The mode name, e.g. ``"local"``.
    mode: str = ""

    def __init__(self, runtime: Runtime, **options: Any) -> None:
        self.runtime = runtime
        self.options = options

    def start(self) -> None:
        """Acquire resources (a cluster connection, a server session). Called once."""

    def create(self, cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any | None:
        """Build component ``cls(*args, **kwargs)`` somewhere, or return ``None`` to build it here.

        ``kwargs`` holds ``remote_group=`` and ``device_mesh=`` when the user passed them.
        """
        return None

    def shutdown(self) -> None:
        """Release everything :meth:`start` and :meth:`create` acquired."""
