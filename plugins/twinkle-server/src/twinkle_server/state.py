"""The server's state and the operations both APIs (Tinker and twinkle) share.

:class:`ServerState` ties together the SQLite :class:`~twinkle_server.store.Store`, the
:class:`~twinkle_server.engine.LoRAEngine` and the :class:`~twinkle_server.scheduler.Scheduler`.
Everything a tenant names (a run, a checkpoint, a sampler) is looked up with the tenant's
id, so another tenant's objects are simply "not found".

It owns the engine's slots (training runs, cached checkpoint samplers, sampling snapshots) under
its engine lock, the tenants' request charges and the housekeeping sweep. Whether a tenant may take
another adapter, and whether the pool admits a new training run, is its
:attr:`~ServerState.admission` (:class:`~twinkle_server.admission.AdmissionLedger`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from twinkle_server import checkpoints as ckpt
from twinkle_server.adapter_pool import AdapterPoolFull, pool_of
from twinkle_server.admission import AdmissionLedger, SlotReservation
from twinkle_server.config import ServerConfig
from twinkle_server.engine import ALL_TARGETS, TARGET_GROUPS, LoRAEngine
from twinkle_server.quotas import Limits, QuotaExceeded, RateLimiter
from twinkle_server.scheduler import Job, Payload, Scheduler, UserError
from twinkle_server.session_futures import SessionFutures
from twinkle_server.stability import StabilityRecords
from twinkle_server.store import CheckpointRow, Store, Tenant

RESTART_MESSAGE = (
    "the server restarted before this request finished, and training runs lose their in-memory "
    "state on restart; resume from your last checkpoint (create_training_client_from_state_with_optimizer)"
)
JSON = "application/json"


class NotFound(LookupError):
    """The tenant has no such object (or it belongs to another tenant)."""


class FutureWaiters:
    """Wakes long-polling ``retrieve_future`` handlers when the worker finishes a job."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, asyncio.Event] = {}

    def event(self, future_id: str) -> asyncio.Event:
        """The event for ``future_id`` (call on the event loop)."""
        return self._events.setdefault(future_id, asyncio.Event())

    def notify(self, future_id: str) -> None:
        """Wake waiters of ``future_id`` (call from any thread)."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._set, future_id)

    def _set(self, future_id: str) -> None:
        event = self._events.pop(future_id, None)
        if event is not None:
            event.set()


def lora_targets(train_attn: bool, train_mlp: bool, train_unembed: bool) -> tuple[str, ...]:
    """Module names for Tinker's LoRA switches."""
    chosen = [
        name
        for flag, group in ((train_attn, "attn"), (train_mlp, "mlp"), (train_unembed, "unembed"))
        if flag
        for name in TARGET_GROUPS[group]
    ]
    if not chosen:
        raise UserError("at least one of train_attn, train_mlp and train_unembed must be true")
    return tuple(chosen)


#: A session that has not heartbeated for this long no longer protects its snapshots from eviction.
SNAPSHOT_SESSION_IDLE_S = 300.0


class ServerState:
    """Store + engine + scheduler, and the shared operations.

    Args:
        config: the :class:`ServerConfig`.
        engine: a prepared engine (tests share one); default: built from ``config``.
    """

    def __init__(self, config: ServerConfig, engine: LoRAEngine | None = None, vllm_sampler: Any = None) -> None:
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        ckpt.recover(config.checkpoint_root)
        # parked adapters live only as long as the process that parked them (runs restart unloaded)
        shutil.rmtree(config.parked_dir, ignore_errors=True)
        self.store = Store(config.database)
        self.store.fail_pending_futures(RESTART_MESSAGE)
        self.store.unload_all_runs()
        if engine is None:
            import inspect

            paging = {
                "device_slots": config.resident_slots,
                "host_bytes": config.host_budget_bytes,
                "spill_dir": config.parked_dir,
            }
            accepted = inspect.signature(LoRAEngine).parameters  # an engine with an adapter pool takes these
            engine = LoRAEngine(
                config.model_dir,
                max_adapters=config.max_adapters,
                max_rank=config.max_rank,
                seed=config.seed,
                device=config.device,
                **{k: v for k, v in paging.items() if k in accepted},
            )
        self.engine = engine
        self.waiters = FutureWaiters()
        self.rate = RateLimiter()
        self.scheduler = Scheduler(
            self.engine,
            self._on_done,
            max_batch_rows=config.max_batch_rows,
            batch_window_s=config.batch_window_s,
            seq_window=config.seq_window,
            seq_wait_s=config.seq_wait_s,
            slice_s=config.sample_slice_s if config.sample_slice_s > 0 else None,
        )
        #: what serves Tinker sampling: the engine itself (torch) or :class:`VLLMSampling` (``--sampler vllm``).
        self.sampling: Any = self._sampling(config, vllm_sampler)
        #: run id -> engine slot of each loaded training run.
        self.run_slots: dict[str, int] = {}
        #: run id -> tenant id (loaded runs).
        self.run_tenants: dict[str, str] = {}
        #: loaded sampler checkpoints, least recently used first: key -> slot.
        self.sampler_slots: OrderedDict[str, int] = OrderedDict()
        #: sampling session id -> snapshot slot (save_weights_and_get_sampling_client).
        self.snapshot_slots: dict[str, int] = {}
        self._snapshots_by_run: dict[str, list[str]] = {}
        #: snapshot sampler id -> (tenant id, session id, last use): who references it, how recently.
        self._snapshot_refs: dict[str, tuple[str, str, float]] = {}
        #: sampled sequences recorded for stable_reinforce (record_stability_info=True).
        self.stability = StabilityRecords()
        #: sampling futures per (tenant, sampling session, clone), for the batched retrieve_futures.
        self.session_futures = SessionFutures()
        self._lock = threading.RLock()
        #: the adapter ledger both APIs share, and the pool's admission of new training runs.
        self.admission = AdmissionLedger(
            self.store,
            self.engine,
            self.limits,
            lambda: len(self.sampler_slots) + len(self.snapshot_slots),
            config.run_idle_s,
        )
        self._sweeping = threading.Event()
        self._sweeper: threading.Thread | None = None

    def _sampling(self, config: ServerConfig, vllm_sampler: Any) -> Any:
        """The engine (torch sampling), or a :class:`~twinkle_server.vllm_sampling.VLLMSampling` on it."""
        from twinkle_server.vllm_sampling import VLLMSampling, vllm_available

        choice = config.sampler
        if choice == "auto":
            choice = "vllm" if vllm_sampler is not None or vllm_available() else "torch"
        if choice == "torch":
            return self.engine
        if vllm_sampler is None and not vllm_available():
            raise ImportError("--sampler vllm needs twinkle-vllm and vLLM: pip install twinkle-vllm (see docs/vllm.md)")
        return VLLMSampling(
            self.engine,
            sampler=vllm_sampler,
            max_loras=config.vllm_max_loras,
            seed=config.seed,
            engine_args=config.vllm_engine_args,
        )

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        """Warm the engine up and start the worker and the housekeeping thread."""
        self.engine.warmup()
        self.scheduler.start()
        self._sweeping.clear()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="twinkle-sweeper", daemon=True)
        self._sweeper.start()

    def _sweep_loop(self) -> None:
        period = max(0.2, min(60.0, self.config.run_idle_s / 4 or 60.0, self.config.future_ttl_s / 4 or 60.0))
        while not self._sweeping.wait(period):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - housekeeping must not stop the server
                logging.getLogger("twinkle_server").exception("housekeeping failed")

    def sweep(self, now: float | None = None) -> dict[str, int]:
        """Unload idle runs and release idle twinkle objects (``run_idle_s``); delete old finished
        futures (``future_ttl_s``)."""
        now = time.time() if now is None else now
        unloaded = 0
        if self.config.run_idle_s > 0:
            before = now - self.config.run_idle_s
            for run_id, _ in self.store.idle_runs(before):
                if self.engine_parks:  # parked on the worker, reloaded on use
                    self.scheduler.call_soon(lambda run_id=run_id: self._park_run(run_id, before))
                    unloaded += 1
                    continue
                self.scheduler.call_soon(lambda run_id=run_id: self._free_run(run_id))
                for job in self.scheduler.forget_model(run_id):
                    self._on_done(job.future_id, None, f"training run {run_id} was unloaded (idle)", "user")
                self.store.set_run_state(run_id, "unloaded")
                unloaded += 1
        if self.config.run_idle_s > 0:
            from twinkle_server.twinkle_host import expire_idle_objects

            unloaded += expire_idle_objects(self, now - self.config.run_idle_s)
        pruned = self.store.prune_futures(now - self.config.future_ttl_s) if self.config.future_ttl_s > 0 else 0
        return {"unloaded": unloaded, "pruned": pruned}

    def stop(self) -> None:
        """Stop the worker, write the pass statistics (``config.stats_file``) and close the database."""
        self._sweeping.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=30)
        self.scheduler.stop()
        if self.sampling is not self.engine:
            self.sampling.close()
        if self.config.stats_file is not None:
            path = Path(self.config.stats_file)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(self.scheduler.pass_stats()))
            tmp.replace(path)
        self.store.close()

    def _on_done(self, future_id: str, payload: Payload | None, error: str | None, category: str | None) -> None:
        if payload is not None and len(payload[1]) > self.config.max_result_bytes:
            payload, category = None, "user"
            error = (
                f"the result is larger than this server keeps ({self.config.max_result_bytes} bytes); "
                "save a checkpoint and load it instead of fetching large state"
            )
        if error is not None:
            self.store.fail_future(future_id, error, category or "user")
        else:
            assert payload is not None
            self.store.finish_future(future_id, payload[0], payload[1])
        self.waiters.notify(future_id)

    # -- tenants and limits ------------------------------------------------------------
    def limits(self, tenant: Tenant) -> Limits:
        """The tenant's quotas (its own, else the server defaults)."""
        c = self.config
        return Limits(
            tenant.max_adapters if tenant.max_adapters is not None else c.max_adapters_per_tenant,
            tenant.max_tokens_per_request if tenant.max_tokens_per_request is not None else c.max_tokens_per_request,
            tenant.requests_per_minute if tenant.requests_per_minute is not None else c.requests_per_minute,
        )

    def charge(self, tenant: Tenant, tokens: int = 0) -> None:
        """Count one compute request of ``tokens`` tokens against the tenant's quotas.

        Raises:
            QuotaExceeded: 429 over the rate, 413 over the tokens-per-request limit.
        """
        limits = self.limits(tenant)
        if tokens > limits.max_tokens_per_request:
            raise QuotaExceeded(
                f"this request has {tokens} tokens but tenant {tenant.name!r} may send at most "
                f"{limits.max_tokens_per_request} per request; split it into smaller batches",
                413,
            )
        wait = self.rate.wait(tenant.id, limits.requests_per_minute)
        if wait:
            raise QuotaExceeded(
                f"tenant {tenant.name!r} is over its rate of {limits.requests_per_minute} requests per minute; "
                f"slow down and retry in {wait:.1f} s",
                429,
                retry_after=wait,
            )

    def charge_request(self, tenant: Tenant) -> None:
        """Count one request of any kind (every authenticated route) against the tenant's control rate.

        Raises:
            QuotaExceeded: 429 (with the seconds to wait) over the rate.
        """
        per_minute = max(self.config.control_requests_per_minute, self.limits(tenant).requests_per_minute)
        wait = self.rate.wait(f"{tenant.id}/all", per_minute)
        if wait:
            raise QuotaExceeded(
                f"tenant {tenant.name!r} is over its rate of {per_minute} requests per minute (all routes); "
                f"slow down and retry in {wait:.1f} s",
                429,
                retry_after=wait,
            )

    # -- futures -------------------------------------------------------------------
    def submit(
        self,
        tenant: Tenant,
        kind: str,
        *,
        model_id: str | None = None,
        seq_id: int | None = None,
        run: Callable[[], Payload] | None = None,
        prepare: Callable[[], Any] | None = None,
        finish: Callable[[Any], Payload] | None = None,
        rows: int = 0,
        start: Callable[[], Any] | None = None,
    ) -> str:
        """Record a pending future and queue its job (charged to ``tenant``'s fair share); returns the request id.

        ``start`` makes it a sliced job (a resumable generation; ``finish`` turns it into the payload).
        """
        future_id = self.store.create_future(tenant.id, model_id, kind)
        job = Job(
            future_id,
            model_id,
            seq_id,
            kind,
            run=run,
            prepare=prepare,
            finish=finish,
            rows=rows,
            tenant=tenant.id,
            start=start,
        )
        try:
            self.scheduler.submit(job)
        except UserError as exc:
            self.store.fail_future(future_id, str(exc), "user")
            raise
        return future_id

    # -- runs ------------------------------------------------------------------------
    def run_for(self, tenant: Tenant, run_id: str) -> Any:
        """The tenant's run, or :class:`NotFound`."""
        run = self.store.run(tenant.id, run_id)
        if run is None:
            raise NotFound(f"training run {run_id!r} not found")
        return run

    def loaded_slot(self, tenant: Tenant, run_id: str) -> int:
        """(Worker) the engine slot of a loaded run of this tenant; a run parked for idleness counts
        against the tenant's quota again (its adapter reloads when the engine next uses it).

        Raises:
            NotFound: no such run for this tenant.
            UserError: the run exists but is not in memory (server restart or unloaded), or
                reloading a parked run would exceed the tenant's quota.
        """
        run = self.run_for(tenant, run_id)
        if run.state == "idle" and run_id in self.run_slots:
            with self.admission.lock:
                try:
                    self.admission.check_adapter_quota(tenant)
                except QuotaExceeded as exc:
                    raise UserError(
                        f"training run {run_id} was unloaded after {self.config.run_idle_s:.0f} s idle and reloading "
                        f"it would exceed the tenant's limit: {exc}"
                    ) from None
                self.store.set_run_state(run_id, "active")
            self.store.touch_run(run_id)
            return self.run_slots[run_id]
        slot = self.run_slots.get(run_id)
        if slot is None or self.run_tenants.get(run_id) != tenant.id:
            if run.state == "unloaded":
                raise UserError(
                    f"training run {run_id} is no longer in memory (the server restarted or it was unloaded); "
                    "resume it from a checkpoint with create_training_client_from_state_with_optimizer"
                )
            raise UserError(f"training run {run_id} is still being created; wait for create_model to finish")
        return slot

    # -- the adapter pool --------------------------------------------------------------
    @property
    def pool(self) -> Any:
        """The engine's adapter pool interface (:func:`twinkle_server.adapter_pool.pool_of`)."""
        return pool_of(self.engine)

    @property
    def engine_parks(self) -> bool:
        """Whether the engine can park idle adapters (unload them, reloading on use)."""
        return bool(self.pool.can_park)

    def _park_run(self, run_id: str, before: float) -> None:
        """(Worker) unload an idle run's adapter (reloaded on its next use) unless a request touched it
        since the sweep: it then stops counting against the tenant's quota."""
        with self._lock:
            tenant_id = self.run_tenants.get(run_id)
            slot = self.run_slots.get(run_id)
            run = self.store.run(tenant_id, run_id) if tenant_id is not None else None
            if run is None or slot is None or run.state != "active" or run.last_request >= before:
                return
            if self.pool.park(slot):
                self.store.set_run_state(run_id, "idle")

    def capacity(self, tenant: Tenant | None = None) -> dict[str, Any]:
        """The adapter pool's figures (``GET /api/v1/capacity``): device slots, resident, paged,
        unloaded (idle) and free, host memory used and budget, live adapters and their limit, the
        idle-unload time, and the asking tenant's holding and limit."""
        cap = dict(self.pool.capacity())
        cap["live"] = cap["resident"] + cap["paged"]
        cap["max_adapters"] = self.engine.max_adapters
        cap["creating"] = self.admission.creating
        cap["idle_unload_s"] = self.config.run_idle_s
        if tenant is not None:
            limit = self.limits(tenant).max_adapters
            cap["tenant"] = {"name": tenant.name, "held": self.admission.held(tenant.id), "limit": limit}
        return cap

    def _make_room(self) -> None:
        """Free a slot when the pool is full: a cached checkpoint sampler first (reloadable from disk),
        then the snapshot least worth keeping (see :meth:`_snapshot_victim`)."""
        while self.engine.free_slots <= 0 and (self.sampler_slots or self.snapshot_slots):
            self._evict_one()

    def _evict_one(self) -> None:
        """Free one cached sampler slot (reloadable from disk), else the snapshot least worth keeping."""
        if self.sampler_slots:
            _, slot = self.sampler_slots.popitem(last=False)
        else:
            sampler_id = self._snapshot_victim()
            slot = self.snapshot_slots.pop(sampler_id)
            self._snapshot_refs.pop(sampler_id, None)
        self.engine.free_slot(slot)

    def _snapshot_victim(self) -> str:
        """The snapshot to evict: unreferenced ones first (their session finished or stopped heartbeating
        for ``SNAPSHOT_SESSION_IDLE_S``), then the least recently used. The SDK never says that a sampling
        client was dropped, so a live session's snapshots stay evictable as a last resort, least recently
        sampled first: a sampler used every step (DPO's reference) outlives one-off evaluation snapshots."""
        now = time.time()

        def rank(sampler_id: str) -> tuple[int, float]:
            tenant_id, session_id, last_use = self._snapshot_refs.get(sampler_id, ("", "", 0.0))
            session = self.store.session(tenant_id, session_id) if session_id else None
            live = (
                session is not None
                and not session["finished"]
                and now - session["last_heartbeat"] < SNAPSHOT_SESSION_IDLE_S
            )
            return (1 if live else 0, last_use)

        return min(self.snapshot_slots, key=rank)

    def touch_snapshot(self, sampler_id: str) -> None:
        """Record a use of a snapshot sampler (its eviction rank is by last use)."""
        with self._lock:
            ref = self._snapshot_refs.get(sampler_id)
            if ref is not None:
                self._snapshot_refs[sampler_id] = (ref[0], ref[1], time.monotonic())

    def _with_room(self, create: Callable[[], int]) -> int:
        """(Worker) ``create()`` a slot, evicting cached samplers and snapshots while the pool is full
        (by count, or by host memory: :class:`~twinkle_server.engine.AdapterPoolFull`)."""
        self._make_room()
        while True:
            try:
                return create()
            except AdapterPoolFull:
                if not (self.sampler_slots or self.snapshot_slots):
                    raise
                self._evict_one()

    def create_run_slot(
        self, tenant: Tenant, run_id: str, lora: dict[str, Any], reservation: SlotReservation | None = None
    ) -> Payload:
        """(Worker) allocate the run's adapter, taking over ``reservation``
        (:meth:`AdmissionLedger.reserve_slot`'s)."""
        with self._lock:
            targets = lora_targets(
                lora.get("train_attn", True), lora.get("train_mlp", True), lora.get("train_unembed", True)
            )
            slot = self._with_room(
                lambda: self.admission.hand_over(
                    reservation,
                    lambda: self.engine.create_slot(
                        int(lora["rank"]), alpha=lora.get("alpha"), targets=targets, seed=lora.get("seed")
                    ),
                )
            )
            self.run_slots[run_id] = slot
            self.run_tenants[run_id] = tenant.id
        return JSON, json.dumps({"model_id": run_id, "type": "create_model"}).encode()

    def unload_run(self, tenant: Tenant, run_id: str, *, delete: bool = False) -> None:
        """Free a run's adapter (and, with ``delete``, its checkpoints)."""
        self.run_for(tenant, run_id)
        self.scheduler.call_soon(lambda: self._free_run(run_id))
        for job in self.scheduler.forget_model(run_id):
            self._on_done(job.future_id, None, f"training run {run_id} was unloaded", "user")
        if delete:
            for row in self.store.checkpoints(tenant.id, run_id):
                self.delete_checkpoint(tenant, run_id, row.kind, row.name)
            self.store.set_run_state(run_id, "deleted")
        else:
            self.store.set_run_state(run_id, "unloaded")

    def _free_run(self, run_id: str) -> None:
        """(Worker) free a run's adapter and its sampling snapshots."""
        with self._lock:
            slot = self.run_slots.pop(run_id, None)
            self.run_tenants.pop(run_id, None)
            if slot is not None:
                self.engine.free_slot(slot)
            for sampler_id in self._snapshots_by_run.pop(run_id, []):
                snap = self.snapshot_slots.pop(sampler_id, None)
                if snap is not None:
                    self.engine.free_slot(snap)

    def _free_sampler(self, key: str) -> None:
        """(Worker) drop a cached sampler adapter."""
        with self._lock:
            slot = self.sampler_slots.pop(key, None)
            if slot is not None:
                self.engine.free_slot(slot)

    # -- checkpoints -------------------------------------------------------------------
    def save_checkpoint(
        self,
        tenant: Tenant,
        run_id: str,
        kind: str,
        name: str,
        *,
        metadata: dict[str, Any] | None,
        ttl_seconds: float | None = None,
    ) -> ckpt.TinkerPath:
        """(Worker) write the run's adapter (+ optimizer for ``training``) atomically and record it.

        ``ttl_seconds``: the checkpoint expires (is deleted) that long after this save; ``None``: never.
        """
        slot = self.loaded_slot(tenant, run_id)
        dest = ckpt.checkpoint_dir(self.config.checkpoint_root, tenant.id, run_id, kind, name)
        with ckpt.atomic_directory(dest) as tmp:
            size = self.engine.save_slot(slot, tmp, optimizer=kind == "training", base_model=self.config.model_name)
        now = time.time()
        self.store.put_checkpoint(CheckpointRow(tenant.id, run_id, kind, name, now, size, metadata, kind == "training"))
        expires = None if ttl_seconds is None else now + ttl_seconds
        self.store.set_checkpoint_expiry(tenant.id, run_id, kind, name, expires)
        with self._lock:
            stale = self.sampler_slots.pop(self._sampler_key(tenant.id, run_id, kind, name), None)
            if stale is not None:
                self.engine.free_slot(stale)
        return ckpt.TinkerPath(run_id, kind, name)

    def resolve_checkpoint(self, tenant: Tenant, path: str) -> tuple[ckpt.TinkerPath, CheckpointRow]:
        """Parse a ``tinker://`` path and find the tenant's checkpoint.

        Raises:
            CheckpointPathError: malformed or unsafe path.
            NotFound: no such checkpoint of this tenant.
        """
        parsed = ckpt.parse_tinker_path(path)
        if parsed.kind == "external":
            raise ckpt.CheckpointPathError(
                f"{path}: external weights are for download; load weights/ or sampler_weights/"
            )
        self.expire_checkpoints()
        row = self.store.checkpoint(tenant.id, parsed.run_id, parsed.kind, parsed.name)
        if row is None:
            raise NotFound(f"checkpoint {path} not found")
        return parsed, row

    def checkpoint_files(self, tenant: Tenant, parsed: ckpt.TinkerPath) -> Any:
        """The directory of a resolved checkpoint."""
        return ckpt.checkpoint_dir(self.config.checkpoint_root, tenant.id, parsed.run_id, parsed.kind, parsed.name)

    def expire_checkpoints(self, now: float | None = None) -> int:
        """Delete every checkpoint whose TTL has passed (files, metadata, cached sampler); returns how many."""
        expired = self.store.expired_checkpoints(time.time() if now is None else now)
        for tenant_id, run_id, kind, name in expired:
            ckpt.remove_directory(ckpt.checkpoint_dir(self.config.checkpoint_root, tenant_id, run_id, kind, name))
            self.store.delete_checkpoint(tenant_id, run_id, kind, name)
            key = self._sampler_key(tenant_id, run_id, kind, name)
            self.scheduler.call_soon(lambda key=key: self._free_sampler(key))
        return len(expired)

    def delete_checkpoint(self, tenant: Tenant, run_id: str, kind: str, name: str) -> None:
        """Delete a checkpoint of this tenant (files and metadata).

        Raises:
            NotFound: no such checkpoint of this tenant.
        """
        if self.store.checkpoint(tenant.id, run_id, kind, name) is None:
            raise NotFound(f"checkpoint {ckpt.KIND_SEGMENT[kind]}/{name} of {run_id} not found")
        ckpt.remove_directory(ckpt.checkpoint_dir(self.config.checkpoint_root, tenant.id, run_id, kind, name))
        self.store.delete_checkpoint(tenant.id, run_id, kind, name)
        key = self._sampler_key(tenant.id, run_id, kind, name)
        self.scheduler.call_soon(lambda: self._free_sampler(key))

    def load_into_run(
        self,
        tenant: Tenant,
        run_id: str,
        path: str,
        *,
        optimizer: bool,
        reservation: SlotReservation | None = None,
    ) -> Payload:
        """(Worker) replace a loaded run's adapter with a checkpoint's (and its optimizer); a new run's
        ``reservation`` (:meth:`AdmissionLedger.reserve_slot`'s) is taken over with the slot."""
        parsed, row = self.resolve_checkpoint(tenant, path)
        if optimizer and not row.has_optimizer:
            raise UserError(f"{path} has no optimizer state (sampler checkpoints never do); load it without optimizer")
        with self._lock:
            files = self.checkpoint_files(tenant, parsed)
            slot = self._with_room(
                lambda: self.admission.hand_over(reservation, lambda: self.engine.load_slot(files, optimizer=optimizer))
            )
            old = self.run_slots.get(run_id)
            self.run_slots[run_id] = slot
            self.run_tenants[run_id] = tenant.id
            if old is not None:
                self.engine.free_slot(old)
        return JSON, json.dumps({"path": path, "model_id": run_id, "type": "load_weights"}).encode()

    @staticmethod
    def _sampler_key(tenant_id: str, run_id: str, kind: str, name: str) -> str:
        return f"{tenant_id}/{run_id}/{kind}/{name}"

    def sampler_slot(self, tenant: Tenant, model_path: str) -> int:
        """(Worker) the slot holding a checkpoint for sampling, loading it if needed (LRU cache)."""
        parsed, _ = self.resolve_checkpoint(tenant, model_path)
        key = self._sampler_key(tenant.id, parsed.run_id, parsed.kind, parsed.name)
        with self._lock:
            if key in self.sampler_slots:
                self.sampler_slots.move_to_end(key)
                return self.sampler_slots[key]
            files = self.checkpoint_files(tenant, parsed)
            slot = self._with_room(lambda: self.engine.load_slot(files, optimizer=False))
            self.sampler_slots[key] = slot
            return slot

    def snapshot(
        self, tenant: Tenant, run_id: str, sampler_id: str, keep: int | None = None, session_id: str = ""
    ) -> None:
        """(Worker) copy a run's current adapter into a sampling-only slot for ``sampler_id``.

        Snapshots stay until the pool needs their slot (:meth:`_make_room`) or their run is freed;
        ``keep`` (default: no limit) caps a run's snapshots, oldest dropped first.
        """
        import torch

        slot = self.engine.slot(self.loaded_slot(tenant, run_id))
        with self._lock:
            new_id = self._with_room(lambda: self.engine.create_slot(slot.rank, alpha=slot.alpha, targets=slot.targets))
            new = self.engine.slot(new_id)
            names = [getattr(s, "adapter", None) for s in (slot, new)]
            with self.pool.using([n for n in names if n]), torch.no_grad():  # both on the device
                for name, (a, b) in slot.params.items():
                    new.params[name][0].copy_(a)
                    new.params[name][1].copy_(b)
            self.snapshot_slots[sampler_id] = new_id
            self._snapshot_refs[sampler_id] = (tenant.id, session_id, time.monotonic())
            history = self._snapshots_by_run.setdefault(run_id, [])
            history.append(sampler_id)
            while keep is not None and len(history) > keep:
                self._snapshot_refs.pop(history[0], None)
                old = self.snapshot_slots.pop(history.pop(0), None)
                if old is not None:
                    self.engine.free_slot(old)

    def all_targets(self) -> tuple[str, ...]:
        """Every module name a LoRA can target."""
        return ALL_TARGETS
