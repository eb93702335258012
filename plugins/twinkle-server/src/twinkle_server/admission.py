"""Admission: whether a tenant may take another adapter, and whether the pool has room for it.

:class:`AdmissionLedger` (``ServerState.admission``) owns the one adapter ledger both APIs share:
the units each tenant holds (loaded Tinker runs, counted by the store, plus twinkle objects and
their adapters, :meth:`~AdmissionLedger.hold`), the per-tenant limit check, and the pool's
admission of training runs being created (:class:`SlotReservation`). Its :attr:`~AdmissionLedger.lock`
makes a check and the creation it allows one step. Lock order: HTTP handlers take only this lock
and the adapter pool's (``free_slots``, ``check_admit``); only the worker takes this lock and then
the engine's (creating a slot inside :meth:`~AdmissionLedger.hand_over`), never the reverse. The
quotas' figures and the request rate are in :mod:`twinkle_server.quotas`.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from twinkle_server.adapter_pool import AdapterPoolFull, pool_of
from twinkle_server.quotas import Limits, QuotaExceeded
from twinkle_server.store import Store, Tenant

__all__ = ["AdmissionLedger", "SlotReservation"]


class SlotReservation:
    """One training run's place in the adapter pool, counted from its create call until its adapter exists.

    :meth:`AdmissionLedger.reserve_slot` returns it; :meth:`release` (idempotent) gives the place back,
    either when the worker has put the adapter into the pool or when the creation failed.
    """

    def __init__(self, ledger: AdmissionLedger) -> None:
        self._ledger = ledger
        self._open = True

    def release(self) -> None:
        """Stop counting this reservation (once; later calls do nothing)."""
        with self._ledger.lock:
            if self._open:
                self._open = False
                self._ledger.creating = max(0, self._ledger.creating - 1)


class AdmissionLedger:
    """The adapter units each tenant holds and the training runs being created.

    Args:
        store: the server's store (it counts the tenants' loaded Tinker runs).
        engine: the engine whose adapter pool admits new runs.
        limits: a tenant's effective quotas (``ServerState.limits``).
        evictable: how many pool slots hold cached samplers or snapshots, which training runs evict.
        run_idle_s: the idle-unload time (a full pool's 503 suggests waiting for it).
    """

    def __init__(
        self,
        store: Store,
        engine: Any,
        limits: Callable[[Tenant], Limits],
        evictable: Callable[[], int],
        run_idle_s: float,
    ) -> None:
        self._store = store
        self._engine = engine
        self._limits = limits
        self._evictable = evictable
        self._run_idle_s = run_idle_s
        #: the ledger's lock: a check and the creation it allows happen under it together.
        self.lock = threading.RLock()
        #: tenant id -> key -> units held through the twinkle API (objects and their adapters).
        self._held: dict[str, dict[str, int]] = {}
        #: training runs accepted but not yet given a slot (pool-full is answered at creation).
        self.creating = 0

    def held(self, tenant_id: str) -> int:
        """Adapter units the tenant holds: loaded Tinker runs plus twinkle objects and their adapters."""
        with self.lock:
            return self._store.count_runs(tenant_id, "active") + sum(self._held.get(tenant_id, {}).values())

    def check_adapter_quota(self, tenant: Tenant, units: int = 1, *, key: str | None = None) -> None:
        """Raise :class:`QuotaExceeded` unless the tenant may hold ``units`` more (``key``'s own count replaced).

        Call it with :attr:`lock` held and create what it allows before releasing the lock, so
        concurrent creations cannot all pass the same check.
        """
        limit = self._limits(tenant).max_adapters
        with self.lock:
            held = self.held(tenant.id) - (self._held.get(tenant.id, {}).get(key, 0) if key else 0)
            if held + units > limit:
                raise QuotaExceeded(
                    f"tenant {tenant.name!r} holds {held} adapters (training runs, remote models and their adapters, "
                    f"both APIs together) and asks for {units} more; its limit is {limit}. Unload a run "
                    "(unload_model), delete a remote model, or save and delete"
                )

    def hold(self, tenant: Tenant, key: str, units: int) -> None:
        """Set what ``key`` (a twinkle object) holds, after checking the tenant's limit (race-free)."""
        with self.lock:
            if units > self._held.get(tenant.id, {}).get(key, 0):
                self.check_adapter_quota(tenant, units, key=key)
            self._held.setdefault(tenant.id, {})[key] = units

    def release(self, tenant_id: str, key: str) -> None:
        """Drop what ``key`` held."""
        with self.lock:
            self._held.get(tenant_id, {}).pop(key, None)

    def reserve_slot(self, rank: int | None = None, targets: Any = None) -> SlotReservation:
        """Count one training run being created against the pool; 503 (with a retry hint) when it is full.

        Full: ``max_adapters`` live adapters, or (given ``rank`` and ``targets``) no room for the
        adapter in the host-memory budget of paged adapters. Call with :attr:`lock` held; the worker
        hands the returned reservation over when the adapter is in the pool (:meth:`hand_over`: in
        one section under :attr:`lock`, so no check ever counts the adapter twice, as reserved and
        as live) and releases it when the creation failed. Sampler and snapshot slots count as
        free: they are evicted for training runs.
        """
        with self.lock:
            retry = self._retry_after()
            evictable = self._evictable()
            free = self._engine.free_slots + evictable - self.creating
            if free <= 0:
                raise QuotaExceeded(
                    f"all {self._engine.max_adapters} adapter slots of this server are in use (--max-adapters); "
                    f"retry later (runs idle for {self._run_idle_s:.0f} s are unloaded)",
                    503,
                    retry_after=retry,
                )
            if rank is not None and not evictable:  # cached samplers and snapshots make room for training runs
                try:
                    pool_of(self._engine).check_admit(rank, targets, pending=self.creating)
                except AdapterPoolFull as exc:
                    raise QuotaExceeded(str(exc), 503, retry_after=retry) from None
            self.creating += 1
            return SlotReservation(self)

    def hand_over(self, reservation: SlotReservation | None, create: Callable[[], int]) -> int:
        """(Worker) ``create()`` a slot and release its reservation in one :attr:`lock` section.

        Between the adapter entering the pool and the reservation's release, a concurrent
        :meth:`reserve_slot` would count it twice (live and reserved) and answer a spurious 503.
        """
        if reservation is None:
            return create()
        with self.lock:
            slot = create()
            reservation.release()
            return slot

    def _retry_after(self) -> float:
        """Seconds a 503 for a full pool suggests waiting: until the next idle run is unloaded (at most
        ``run_idle_s``), else 30."""
        idle = self._run_idle_s
        if idle <= 0:
            return 30.0
        oldest = self._store.oldest_active_request()
        wait = idle if oldest is None else oldest + idle - time.time()
        return float(min(max(wait, 1.0), max(idle, 1.0)))
