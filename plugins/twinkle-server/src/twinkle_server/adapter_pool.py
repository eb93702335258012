"""The server's view of the engine's adapter pool (:class:`twinkle.model.adapter_pool.AdapterPool`).

The engine pages tenant adapters between the device and host memory and parks idle ones
(``LoRAEngine.adopt``, ``disown``, ``using``, ``park``, ``check_admit``, ``capacity``...).
:func:`pool_of` gives the server that interface for any engine: the engine itself when it has
a pool, else :class:`NoAdapterPool`, which keeps the slot-count behaviour of an engine
without one (nothing is paged or parked; idle runs are unloaded for good).

Example::

    pool = pool_of(state.engine)
    with pool.using([adapter]):        # on the device (paged in or reloaded) while held
        ...
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence


class AdapterPoolFull(ValueError):
    """The adapter pool has no room (``--max-adapters`` live adapters, or the ``--adapter-host-gb``
    budget); ``retry_after`` hints when idle adapters will have been unloaded."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after if retry_after is not None else 30.0

    @classmethod
    def of(cls, exc: Any) -> AdapterPoolFull:
        """The server's wording of a :class:`twinkle.model.adapter_pool.PoolFull` (its limits as server options)."""
        message = str(exc).replace("adapter pool full", "this server's adapter pool is full", 1)
        message = message.replace("(max_live)", "(--max-adapters)").replace(
            "host-memory budget", "host-memory budget (--adapter-host-gb)"
        )
        return cls(message, getattr(exc, "retry_after", None))


class NoAdapterPool:
    """The pool interface over an engine without one: every adapter stays on the device."""

    can_park = False

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def adopt(self, name: str) -> None:
        """Nothing to track."""

    def disown(self, name: str) -> None:
        """Nothing to track."""

    def owns(self, name: str) -> bool:
        """Every adapter is simply resident."""
        return True

    @contextlib.contextmanager
    def using(self, names: Sequence[str]) -> Iterator[None]:
        """The engine's lock when it has one (adapters are always on the device)."""
        lock = getattr(self.engine, "lock", None)
        with lock if lock is not None else contextlib.nullcontext():
            yield

    def park(self, slot_id: int) -> bool:
        """No parking: idle runs are unloaded instead."""
        return False

    def park_adapter(self, name: str) -> bool:
        """No parking."""
        return False

    def check_admit(self, rank: int, targets: Sequence[str] | None, *, pending: int = 0) -> None:
        """The slot count is checked by the server; no host budget."""

    def capacity(self) -> dict[str, int]:
        """Slots in use by the engine's slots (nothing paged or unloaded)."""
        live = len(getattr(self.engine, "slots", {}))
        slots = int(self.engine.max_adapters)
        return {
            "slots": slots,
            "resident": live,
            "paged": 0,
            "unloaded": 0,
            "free": slots - live,
            "host_bytes_used": 0,
            "host_bytes_budget": 0,
        }


def pool_of(engine: Any) -> Any:
    """The engine when it manages an adapter pool, else :class:`NoAdapterPool` over it."""
    return engine if getattr(engine, "pool", None) is not None and hasattr(engine, "using") else NoAdapterPool(engine)
