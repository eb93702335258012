"""The adapter pool: which adapters sit on the device, which are paged, which are unloaded.

One job: the policy over :class:`~twinkle.model.paging.AdapterPager` for a multi-tenant service.
:class:`AdapterPool` keeps a bounded number of resident **slots** on the device, a **host-memory
budget** for every live adapter (each reserves its host block when added, so paging out never
allocates and never fails), pages least-recently-used idle adapters out when a pass needs slots,
controls admission at creation (:meth:`AdapterPool.can_admit`, sized by
:func:`estimate_lora_bytes`), reports capacity figures (:meth:`AdapterPool.capacity`) and
unloads adapters idle past a TTL through a save callback (or a spill file), reloading them on
next use through a load callback (:meth:`AdapterPool.reap_idle`).

Example::

    pool = AdapterPool(model, slots=8, host_bytes_budget=64 << 30)
    model.add_adapter_to_model("alice", LoraConfig(r=8, target_modules="all-linear"))
    pool.add("alice")
    with pool.use(["alice", "bob"]):        # resident for this pass, never paged meanwhile
        forward_backward_multi(model, {"alice": rows_a, "bob": rows_b})
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from twinkle.model.paging import AdapterPager, PoolError, aligned_bytes

__all__ = [
    "AdapterPool",
    "PoolError",
    "PoolFull",
    "estimate_lora_bytes",
    "lora_target_shapes",
]

#: Bytes a live adapter reserves per parameter tensor beyond its data: a fused optimizer's step
#: count on the device, and the alignment of the block's sections.
_SLACK = 64
#: What a live adapter reserves per parameter byte by default: the parameter, its gradient and
#: two optimizer moments (AdamW).
DEFAULT_COPIES = 4


class PoolFull(PoolError):
    """No room for another adapter: the host-memory budget (or the slots) is used up.

    Attributes:
        retry_after: a hint, in seconds, for when to try again (idle adapters are unloaded after
            the pool's TTL; ``None`` when it has none).
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# ---------------------------------------------------------------------- sizes
def lora_target_shapes(model: Any, targets: Any) -> list[tuple[int, int]]:
    """``(in_features, out_features)`` of every linear layer a LoRA with ``targets`` would wrap.

    Args:
        model: a ``TransformersModel`` or a torch module.
        targets: module name suffixes (``["q_proj", "v_proj"]``), or ``"all-linear"`` (every
            linear layer but the output head, as peft picks them).
    """
    import torch

    module = model
    if hasattr(model, "_hf_model"):
        module = model._hf_model()
    elif hasattr(model, "model") and not isinstance(model, torch.nn.Module):
        module = model.model
    wanted = None if targets == "all-linear" else {targets} if isinstance(targets, str) else set(targets)
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    shapes = []
    for name, layer in module.named_modules():
        if not isinstance(layer, torch.nn.Linear) or ".lora_" in name or name.startswith("lora_"):
            continue
        parts = name.split(".")
        leaf = parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1]  # peft-wrapped
        if wanted is None and layer is head:
            continue
        if wanted is None or leaf in wanted:
            shapes.append((layer.in_features, layer.out_features))
    return shapes


def estimate_lora_bytes(
    model: Any, rank: int, targets: Any, *, dtype_bytes: int = 4, copies: int = DEFAULT_COPIES
) -> int:
    """Host bytes a LoRA adapter of ``rank`` on ``targets`` reserves in an :class:`AdapterPool`.

    ``rank x (in + out)`` elements per wrapped linear layer, ``dtype_bytes`` each (peft keeps
    LoRA weights in float32 by default), times ``copies`` (parameter, gradient and AdamW's two
    moments: 4), plus 64 bytes per tensor (a fused AdamW's step counts, section alignment).
    """
    shapes = lora_target_shapes(model, targets)
    elements = sum(rank * (i + o) for i, o in shapes)
    return aligned_bytes(elements * dtype_bytes * copies + _SLACK * 2 * len(shapes))


# ---------------------------------------------------------------------- the pool
RESIDENT, PAGED, UNLOADED = "resident", "paged", "unloaded"


@dataclass
class _Entry:
    state: str
    last_used: float
    reserved: int = 0
    pins: int = 0


class AdapterPool:
    """Bounded device slots plus a host-memory budget for the adapters of one model.

    Every live adapter (resident or paged) holds a host block of its size (reserved when added,
    counted against ``host_bytes_budget``), so paging one out never allocates and never fails:
    the number of live adapters is bounded by host memory, the number on the device by
    ``slots``. Unloaded adapters (idle past ``idle_ttl_s``, see :meth:`reap_idle`) hold nothing
    and are reloaded on use.

    Args:
        model: the ``TransformersModel`` whose named adapters the pool manages.
        slots: adapters resident on the device at most.
        host_bytes_budget: host bytes all live adapters' blocks may take together.
        idle_ttl_s: :meth:`reap_idle` unloads adapters unused for longer (``None``: never).
        save: ``save(name)`` persists an adapter before it is unloaded (weights, optimizer state,
            whatever its reload needs); it is called with the adapter readable (resident, or
            paged with its own host tensors).
        load: ``load(name)`` adds an unloaded adapter back to the model (with its optimizer
            state), called when it is next acquired.
        drop: ``drop(name)`` removes an adapter from the model after ``save`` (default:
            ``model.remove_adapter(name)``).
        spill_dir: without ``save``/``load``: unload by spilling the adapter's tensors to a file in
            this directory (:meth:`AdapterPager.spill`): the adapter stays in the model with its
            settings and optimizer object, holding no device or host memory, and is read back
            exactly on use. With neither, adapters are never unloaded.
        max_live: live (resident or paged) adapters at most, whatever their size (``None``: only
            the host budget bounds them).
        pager: the :class:`AdapterPager` (default: one on ``model``).
        clock: the time source of ``last_used`` and :meth:`reap_idle` (default ``time.monotonic``).

    Thread-safe: every method takes the pool's lock. The methods that move or remove adapters
    (``add``, ``acquire``, ``use``, ``reap_idle``, ``remove``) call into the model and must run
    where the model runs (a service's worker thread); ``capacity``, ``can_admit``, ``touch`` and
    ``status`` may be called from any thread.

    Raises:
        ValueError: ``slots < 1`` or a negative budget.
    """

    def __init__(
        self,
        model: Any,
        *,
        slots: int,
        host_bytes_budget: int,
        idle_ttl_s: float | None = None,
        save: Callable[[str], Any] | None = None,
        load: Callable[[str], Any] | None = None,
        drop: Callable[[str], Any] | None = None,
        spill_dir: str | os.PathLike | None = None,
        max_live: int | None = None,
        pager: AdapterPager | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if slots < 1:
            raise ValueError(f"AdapterPool: slots must be >= 1, got {slots}")
        if host_bytes_budget < 0:
            raise ValueError(f"AdapterPool: host_bytes_budget must be >= 0, got {host_bytes_budget}")
        self.model = model
        self.slots = int(slots)
        self.host_bytes_budget = int(host_bytes_budget)
        self.idle_ttl_s = idle_ttl_s
        self._save = save
        self._load = load
        self._drop = drop or (lambda name: model.remove_adapter(name))
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.max_live = max_live
        if (save is None) != (load is None):
            raise ValueError("AdapterPool: give both save and load callbacks, or neither")
        self.pager = pager or AdapterPager(model)
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.RLock()
        self.stats = {"page_outs": 0, "page_ins": 0, "unloads": 0, "reloads": 0, "bytes_out": 0, "bytes_in": 0}

    # -- figures ------------------------------------------------------------------------
    def _count(self, state: str) -> int:
        return sum(1 for e in self._entries.values() if e.state == state)

    @property
    def host_bytes_used(self) -> int:
        """Host bytes reserved by the live adapters."""
        with self._lock:
            return sum(e.reserved for e in self._entries.values() if e.state != UNLOADED)

    def capacity(self) -> dict[str, int]:
        """``{slots, resident, paged, unloaded, free, host_bytes_used, host_bytes_budget}``.

        ``free``: device slots not taken by a resident adapter; ``unloaded``: adapters saved
        away for idleness (reloaded on use, holding no memory).
        """
        with self._lock:
            return {
                "slots": self.slots,
                "resident": self._count(RESIDENT),
                "paged": self._count(PAGED),
                "unloaded": self._count(UNLOADED),
                "free": self.slots - self._count(RESIDENT),
                "host_bytes_used": self.host_bytes_used,
                "host_bytes_budget": self.host_bytes_budget,
            }

    def status(self, name: str) -> str | None:
        """``"resident"``, ``"paged"``, ``"unloaded"`` or ``None`` (not in the pool)."""
        with self._lock:
            entry = self._entries.get(name)
            return entry.state if entry else None

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    @property
    def names(self) -> list[str]:
        """Every adapter in the pool (unloaded ones included)."""
        with self._lock:
            return list(self._entries)

    # -- admission ------------------------------------------------------------------------
    def estimate(self, rank: int, targets: Any) -> int:
        """Host bytes an adapter of ``rank`` on ``targets`` would reserve (:func:`estimate_lora_bytes`)."""
        return estimate_lora_bytes(self.model, rank, targets)

    def can_admit(
        self, rank: int | None = None, targets: Any = "all-linear", *, nbytes: int | None = None, **pending: int
    ) -> bool:
        """Whether an adapter of ``rank`` on ``targets`` (or of ``nbytes``) can be added now (:meth:`check_admit`)."""
        try:
            self.check_admit(rank, targets, nbytes=nbytes, **pending)
        except PoolFull:
            return False
        return True

    def check_admit(
        self,
        rank: int | None = None,
        targets: Any = "all-linear",
        *,
        nbytes: int | None = None,
        pending: int = 0,
        pending_bytes: int = 0,
    ) -> int:
        """The bytes the adapter would reserve, or :class:`PoolFull` naming the limit it hits.

        Args:
            rank, targets: the adapter's LoRA rank and target modules (:meth:`estimate`), or
            nbytes: its bytes.
            pending, pending_bytes: admissions granted but not yet :meth:`add`-ed (a service's
                creations in flight), counted as live.

        Raises:
            PoolFull: ``max_live`` adapters are live, or the host budget cannot take the adapter
                (the message names the limit, what is used, what it needs, when idle adapters
                are unloaded).
        """
        if nbytes is None:
            if rank is None:
                raise ValueError("check_admit: give rank (and targets) or nbytes")
            nbytes = self.estimate(rank, targets)
        with self._lock:
            live = len(self._entries) - self._count(UNLOADED) + pending
            used = self.host_bytes_used + pending_bytes
            hint = (
                f"; adapters idle for {self.idle_ttl_s:.0f} s are unloaded, retry later"
                if self.idle_ttl_s
                else "; remove an adapter or retry later"
            )
            if self.max_live is not None and live + 1 > self.max_live:
                raise PoolFull(
                    f"adapter pool full: {live} live adapters, the pool's limit (max_live) is {self.max_live}{hint}",
                    retry_after=self._retry_after(),
                )
            if used + nbytes > self.host_bytes_budget:
                raise PoolFull(
                    f"adapter pool full: {live} live adapters hold {_mib(used)} of the {_mib(self.host_bytes_budget)} "
                    f"host-memory budget and this adapter needs {_mib(nbytes)}{hint}",
                    retry_after=self._retry_after(),
                )
        return nbytes

    def _retry_after(self) -> float | None:
        if not self.idle_ttl_s:
            return None
        now = self.clock()
        idle = [
            e.last_used + self.idle_ttl_s - now for e in self._entries.values() if e.state != UNLOADED and e.pins == 0
        ]
        return max(1.0, min(idle)) if idle else float(self.idle_ttl_s)

    # -- membership ------------------------------------------------------------------------
    def add(self, name: str, nbytes: int | None = None) -> None:
        """Take in an adapter just added to the model (resident), reserving its host block.

        Args:
            name: the adapter name.
            nbytes: bytes to reserve (default: its parameters x :data:`DEFAULT_COPIES`, room for
                gradients and AdamW's moments).

        Raises:
            PoolFull: the host budget cannot take it (the adapter stays in the model; remove it).
            PoolError: it is already in the pool.
        """
        with self._lock:
            if name in self._entries:
                raise PoolError(f"adapter {name!r} is already in the pool")
            if nbytes is None:
                params = self.model.state_of(name).params
                nbytes = sum(p.numel() * p.element_size() for p in params) * DEFAULT_COPIES + _SLACK * len(params)
            nbytes = aligned_bytes(nbytes)
            self.check_admit(nbytes=nbytes)
            self._make_room(1, keep={name})
            self.pager.reserve(name, nbytes)
            self._entries[name] = _Entry(RESIDENT, self.clock(), self.pager.reserved_bytes(name))

    def remove(self, name: str) -> None:
        """Forget an adapter (after, or instead of, removing it from the model); frees its host block."""
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is None:
                return
            # a paged adapter's views keep their memory alive (unpinned) until the model drops them
            self.pager.discard(name)

    def touch(self, name: str) -> None:
        """Record a use of the adapter (LRU order and idleness); no-op for unknown names."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                entry.last_used = self.clock()

    # -- residency ----------------------------------------------------------------------------
    def acquire(self, names: Sequence[str]) -> None:
        """Make the adapters of one pass resident (paging in, reloading unloaded ones) and touch them.

        Least-recently-used resident adapters that are not in ``names`` and not pinned by
        :meth:`use` are paged out to make room.

        Raises:
            PoolError: the pass needs more slots than the pool has, an adapter is not in the pool,
                or the slots are pinned by other passes.
            PoolFull: reloading an unloaded adapter does not fit in the host budget.
        """
        wanted = list(dict.fromkeys(names))
        with self._lock:
            if len(wanted) > self.slots:
                raise PoolError(
                    f"this pass needs {len(wanted)} adapters on the device but the pool has {self.slots} slots; "
                    f"split it into passes of at most {self.slots} adapters"
                )
            for name in wanted:
                if name not in self._entries:
                    raise PoolError(f"adapter {name!r} is not in the pool; add it first (pool.add)")
            keep = set(wanted)
            for name in wanted:
                entry = self._entries[name]
                if entry.state == RESIDENT:
                    continue
                if entry.state == UNLOADED:
                    self._reload(name, entry, keep)
                    continue
                self._make_room(1, keep=keep)
                moved = self.pager.page_in(name)
                entry.state = RESIDENT
                self.stats["page_ins"] += 1
                self.stats["bytes_in"] += moved
            now = self.clock()
            for name in wanted:
                self._entries[name].last_used = now

    @contextlib.contextmanager
    def use(self, names: Sequence[str]) -> Iterator[None]:
        """:meth:`acquire` the adapters and keep them resident (pinned) until the block ends.

        Example::

            with pool.use(["alice", "bob"]):
                forward_backward_multi(model, {"alice": rows_a, "bob": rows_b})
        """
        wanted = list(dict.fromkeys(names))
        with self._lock:
            self.acquire(wanted)
            for name in wanted:
                self._entries[name].pins += 1
        try:
            yield
        finally:
            with self._lock:
                now = self.clock()
                for name in wanted:
                    entry = self._entries.get(name)
                    if entry is not None:
                        entry.pins -= 1
                        entry.last_used = now

    def page_out(self, name: str) -> None:
        """Page an adapter out now (no-op unless resident and unpinned)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.state != RESIDENT or entry.pins:
                return
            self._page_out(name, entry)

    def _page_out(self, name: str, entry: _Entry) -> None:
        moved = self.pager.page_out(name)
        entry.reserved = max(entry.reserved, self.pager.reserved_bytes(name))
        entry.state = PAGED
        self.stats["page_outs"] += 1
        self.stats["bytes_out"] += moved

    def _make_room(self, count: int, keep: set[str]) -> None:
        """Page out least-recently-used idle resident adapters until ``count`` slots are free."""
        resident = [(e.last_used, n) for n, e in self._entries.items() if e.state == RESIDENT]
        need = len(resident) + count - self.slots
        if need <= 0:
            return
        victims = sorted((t, n) for t, n in resident if n not in keep and self._entries[n].pins == 0)
        if len(victims) < need:
            raise PoolError(
                f"no device slot free: all {self.slots} slots hold adapters of running passes; retry when they finish"
            )
        for _, name in victims[:need]:
            self._page_out(name, self._entries[name])

    def _reload(self, name: str, entry: _Entry, keep: set[str]) -> None:
        self.check_admit(nbytes=entry.reserved)
        self._make_room(1, keep=keep)
        if self.pager.is_spilled(name):
            self.stats["bytes_in"] += self.pager.unspill(name)
        elif self._load is not None:
            self._load(name)
        else:
            raise PoolError(f"adapter {name!r} was unloaded and this pool has no load callback")
        self.pager.reserve(name, entry.reserved)
        entry.state = RESIDENT
        entry.reserved = self.pager.reserved_bytes(name)
        self.stats["reloads"] += 1

    # -- idleness ---------------------------------------------------------------------------
    def idle(self, now: float | None = None) -> list[str]:
        """Adapters (not unloaded, not pinned) unused for longer than ``idle_ttl_s``, oldest first."""
        if not self.idle_ttl_s:
            return []
        with self._lock:
            now = self.clock() if now is None else now
            old = [
                (e.last_used, n)
                for n, e in self._entries.items()
                if e.state != UNLOADED and e.pins == 0 and now - e.last_used > self.idle_ttl_s
            ]
            return [n for _, n in sorted(old)]

    @property
    def can_unload(self) -> bool:
        """Whether the pool can unload adapters (save/load callbacks, or a spill directory)."""
        return self._save is not None or self.spill_dir is not None

    def unload(self, name: str) -> bool:
        """Unload one adapter now (idle or not, unless pinned by :meth:`use`): through ``save`` and
        ``drop``, or spilled to ``spill_dir``; its host block is freed and :meth:`acquire` reloads it.

        Returns:
            True when unloaded; False when it is pinned, already unloaded or not in the pool.

        Raises:
            PoolError: the pool has neither callbacks nor a spill directory.
            Exception: whatever ``save``/``drop`` raised (the adapter then stays loaded).
        """
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.state == UNLOADED or entry.pins:
                return False
            if not self.can_unload:
                raise PoolError("this pool has no save callback nor spill directory; adapters stay loaded")
            if self._save is None:
                assert self.spill_dir is not None
                self.stats["bytes_out"] += self.pager.spill(name, self.spill_dir / f"{_file_name(name)}.bin")
            else:
                if entry.state == PAGED:
                    self.pager.materialize(name)  # its own host tensors: readable and savable
                try:
                    self._save(name)
                    self._drop(name)
                except Exception:
                    if entry.state == PAGED:
                        self.pager.page_out(name)  # back into its block from the materialized tensors
                    raise
                self.pager.discard(name)
            entry.state = UNLOADED
            self.stats["unloads"] += 1
            return True

    def reap_idle(self, now: float | None = None) -> list[str]:
        """Unload the adapters idle past ``idle_ttl_s`` (:meth:`unload`); returns their names.

        They stay in the pool as unloaded and :meth:`acquire` reloads them. An adapter whose
        ``save`` raises stays loaded (the first error propagates after the others were tried).

        Raises:
            PoolError: adapters are idle but the pool cannot unload (no callbacks, no spill directory).
        """
        with self._lock:
            names = self.idle(now)
            if names and not self.can_unload:
                raise PoolError("reap_idle: this pool has no save callback nor spill directory; idle adapters stay")
            unloaded: list[str] = []
            failure: BaseException | None = None
            for name in names:
                try:
                    if self.unload(name):
                        unloaded.append(name)
                except Exception as exc:  # noqa: BLE001 - keep it loaded, report after the others
                    failure = failure or exc
            if failure is not None:
                raise failure
            return unloaded


def _file_name(name: str) -> str:
    """A file-name-safe spelling of an adapter name (letters, digits, ``_``, ``-`` kept)."""
    safe = "".join(c if c.isalnum() or c in "_-" else f"%{ord(c):02x}" for c in name)
    return safe or "_"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
