"""Batched ``/api/v1/retrieve_futures``: one long poll per sampling session reports its finished samples.

The SDK (with ``sample_use_retrieve_futures``) runs one poller per (sampling session, cloned
sampler): it sends ``prev_cursor`` and gets every completion after it, each as ``finished`` (with
the payload size) or ``failed``, then fetches payloads with ``retrieve_future``. Here each target
keeps the ids of its submitted samples in order; a poll moves the ones that completed into the
target's log under increasing cursors, trims what the client has seen (``<= prev_cursor``), and
waits for a pending one when nothing is new.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

Target = tuple[str, str, int]  # tenant id, sampling session id, cloned sampler id

#: At most this many unreported completions are kept per target (oldest dropped).
MAX_LOG = 10_000


class SessionFutures:
    """Per-target pending sample ids and the log of their completions."""

    def __init__(self) -> None:
        self._pending: dict[Target, list[str]] = {}
        self._log: dict[Target, list[tuple[int, dict[str, Any]]]] = {}
        self._cursor: dict[Target, int] = {}
        self._lock = threading.Lock()

    def add(self, target: Target, future_id: str) -> None:
        """Register a submitted sample of ``target``."""
        with self._lock:
            self._pending.setdefault(target, []).append(future_id)

    def pending(self, target: Target) -> list[str]:
        with self._lock:
            return list(self._pending.get(target, ()))

    def collect(self, store: Any, target: Target, prev_cursor: int) -> tuple[list[dict[str, Any]], int]:
        """Move completed samples into the log; returns the completions after ``prev_cursor`` and the cursor."""
        tenant_id = target[0]
        with self._lock:
            still = []
            log = self._log.setdefault(target, [])
            cursor = self._cursor.get(target, 0)
            for fid in self._pending.get(target, ()):
                row = store.future(tenant_id, fid)
                if row is None:
                    continue
                if row.status == "pending":
                    still.append(fid)
                    continue
                cursor += 1
                if row.status == "failed":
                    log.append((cursor, {"state": "failed", "request_id": fid}))
                else:
                    size = len(row.result) if row.result is not None else 0
                    log.append(
                        (cursor, {"state": "finished", "request_id": fid, "response_payload_uncompressed_size": size})
                    )
            self._pending[target] = still
            self._cursor[target] = cursor
            log[:] = [entry for entry in log if entry[0] > prev_cursor][-MAX_LOG:]
            return [c for _, c in log], cursor


async def wait_any(events: list[asyncio.Event], timeout: float) -> None:
    """Return when one of ``events`` is set or after ``timeout`` seconds."""
    if not events or timeout <= 0:
        return
    tasks = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
