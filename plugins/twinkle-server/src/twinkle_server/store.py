"""Durable server state in SQLite: tenants, hashed API keys, sessions, runs, checkpoints, futures.

One :class:`Store` per server process. SQLite runs in WAL mode with ``synchronous=NORMAL``:
a committed row survives the process being killed (SIGKILL); only an operating-system
crash may lose the last few commits, never corrupt the database. Every read that a tenant can trigger takes the
tenant id as a filter, so isolation is enforced in the queries themselves, not after them.

API keys are random 256-bit tokens shown once at creation; only their SHA-256 digest is
stored (a key this long cannot be brute-forced, so a slow hash adds nothing).

Example::

    store = Store("/var/lib/twinkle/state.sqlite")
    tenant, key = store.create_tenant("alice")
    assert store.tenant_for_key(key).id == tenant.id
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    created REAL NOT NULL,
    max_adapters INTEGER,
    max_tokens_per_request INTEGER,
    requests_per_minute INTEGER
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    prefix TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    created REAL NOT NULL,
    last_heartbeat REAL NOT NULL,
    user_metadata TEXT,
    display_name TEXT,
    finished INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    base_model TEXT NOT NULL,
    lora TEXT NOT NULL,
    created REAL NOT NULL,
    last_request REAL NOT NULL,
    user_metadata TEXT,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    tenant_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    created REAL NOT NULL,
    size_bytes INTEGER NOT NULL,
    user_metadata TEXT,
    has_optimizer INTEGER NOT NULL,
    PRIMARY KEY (run_id, kind, name)
);
CREATE TABLE IF NOT EXISTS checkpoint_expiry (
    tenant_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (run_id, kind, name)
);
CREATE TABLE IF NOT EXISTS sampling_sessions (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    model_path TEXT,
    base_model TEXT NOT NULL,
    created REAL NOT NULL,
    clients INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS futures (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    model_id TEXT,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    content_type TEXT,
    result BLOB,
    error TEXT,
    category TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS futures_status ON futures(status);
"""


def hash_key(api_key: str) -> str:
    """The stored digest of an API key."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def new_api_key() -> str:
    """A fresh API key (``tml-`` prefix, which the tinker SDK requires)."""
    return "tml-" + secrets.token_urlsafe(32)


def new_id(prefix: str) -> str:
    """An unguessable id such as ``sess-3f2a...``."""
    return f"{prefix}-{secrets.token_hex(12)}"


@dataclass(frozen=True)
class Tenant:
    """A tenant and its quotas (``None`` means the server default)."""

    id: str
    name: str
    max_adapters: int | None = None
    max_tokens_per_request: int | None = None
    requests_per_minute: int | None = None


@dataclass(frozen=True)
class Run:
    """A training run (one LoRA adapter of one tenant)."""

    id: str
    tenant_id: str
    session_id: str
    base_model: str
    lora: dict[str, Any]
    created: float
    last_request: float
    user_metadata: dict[str, Any] | None
    state: str


@dataclass(frozen=True)
class CheckpointRow:
    """Metadata of one saved checkpoint (``kind`` is ``training`` or ``sampler``)."""

    tenant_id: str
    run_id: str
    kind: str
    name: str
    created: float
    size_bytes: int
    user_metadata: dict[str, Any] | None
    has_optimizer: bool


@dataclass(frozen=True)
class FutureRow:
    """A request's future: ``pending``, ``done`` (with a result) or ``failed`` (with an error)."""

    id: str
    tenant_id: str
    model_id: str | None
    kind: str
    status: str
    content_type: str | None
    result: bytes | None
    error: str | None
    category: str | None


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class Store:
    """Thread-safe access to the server's SQLite database.

    Args:
        path: the database file (created with its parent directory).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- tenants and keys --------------------------------------------------------
    def create_tenant(
        self,
        name: str,
        *,
        max_adapters: int | None = None,
        max_tokens_per_request: int | None = None,
        requests_per_minute: int | None = None,
    ) -> tuple[Tenant, str]:
        """Create a tenant and its first API key; returns ``(tenant, api_key)`` (the key is shown once).

        Raises:
            ValueError: a tenant with this name exists.
        """
        tenant = Tenant(new_id("tenant"), name, max_adapters, max_tokens_per_request, requests_per_minute)
        try:
            self._exec(
                "INSERT INTO tenants VALUES (?, ?, ?, ?, ?, ?)",
                (tenant.id, name, time.time(), max_adapters, max_tokens_per_request, requests_per_minute),
            )
        except sqlite3.IntegrityError:
            raise ValueError(f"a tenant named {name!r} already exists; pick another name") from None
        return tenant, self.add_api_key(tenant.id)

    def add_api_key(self, tenant_id: str) -> str:
        """Issue one more API key for a tenant; returns the key (stored only as a hash)."""
        key = new_api_key()
        self._exec("INSERT INTO api_keys VALUES (?, ?, ?, ?)", (hash_key(key), tenant_id, key[:8], time.time()))
        return key

    def tenant_for_key(self, api_key: str) -> Tenant | None:
        """The tenant owning ``api_key``, or ``None``."""
        rows = self._rows(
            "SELECT t.id, t.name, t.max_adapters, t.max_tokens_per_request, t.requests_per_minute "
            "FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.key_hash = ?",
            (hash_key(api_key),),
        )
        return Tenant(*rows[0]) if rows else None

    def tenant_by_name(self, name: str) -> Tenant | None:
        """The tenant called ``name``, or ``None``."""
        rows = self._rows(
            "SELECT id, name, max_adapters, max_tokens_per_request, requests_per_minute FROM tenants WHERE name = ?",
            (name,),
        )
        return Tenant(*rows[0]) if rows else None

    # -- sessions ------------------------------------------------------------------
    def create_session(self, tenant_id: str, user_metadata: Any, display_name: str | None) -> str:
        """A new session id for ``tenant_id``."""
        sid = new_id("sess")
        now = time.time()
        self._exec(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, 0)",
            (sid, tenant_id, now, now, json.dumps(user_metadata), display_name),
        )
        return sid

    def session(self, tenant_id: str, session_id: str) -> dict[str, Any] | None:
        """The tenant's session, or ``None`` (also for another tenant's session)."""
        rows = self._rows(
            "SELECT id, created, last_heartbeat, user_metadata, display_name, finished FROM sessions "
            "WHERE id = ? AND tenant_id = ?",
            (session_id, tenant_id),
        )
        if not rows:
            return None
        sid, created, beat, meta, name, finished = rows[0]
        return {
            "id": sid,
            "created": created,
            "last_heartbeat": beat,
            "user_metadata": _loads(meta),
            "display_name": name,
            "finished": bool(finished),
        }

    def heartbeat(self, tenant_id: str, session_id: str) -> bool:
        """Record a heartbeat; False when the session is unknown to this tenant."""
        cur = self._exec(
            "UPDATE sessions SET last_heartbeat = ? WHERE id = ? AND tenant_id = ?",
            (time.time(), session_id, tenant_id),
        )
        return cur.rowcount > 0

    def finish_session(self, tenant_id: str, session_id: str) -> bool:
        """Mark a session finished; False when unknown to this tenant."""
        cur = self._exec("UPDATE sessions SET finished = 1 WHERE id = ? AND tenant_id = ?", (session_id, tenant_id))
        return cur.rowcount > 0

    def list_sessions(self, tenant_id: str, limit: int, offset: int) -> list[str]:
        """The tenant's session ids, newest first."""
        rows = self._rows(
            "SELECT id FROM sessions WHERE tenant_id = ? ORDER BY created DESC LIMIT ? OFFSET ?",
            (tenant_id, limit, offset),
        )
        return [r[0] for r in rows]

    # -- runs --------------------------------------------------------------------
    def create_run(
        self,
        run_id: str,
        tenant_id: str,
        session_id: str,
        base_model: str,
        lora: dict[str, Any],
        user_metadata: Any,
    ) -> None:
        """Record a new training run in state ``active``."""
        now = time.time()
        self._exec(
            "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'active')",
            (run_id, tenant_id, session_id, base_model, json.dumps(lora), now, now, json.dumps(user_metadata)),
        )

    def run(self, tenant_id: str, run_id: str) -> Run | None:
        """The tenant's run (not deleted), or ``None``."""
        rows = self._rows(
            "SELECT id, tenant_id, session_id, base_model, lora, created, last_request, user_metadata, state "
            "FROM runs WHERE id = ? AND tenant_id = ? AND state != 'deleted'",
            (run_id, tenant_id),
        )
        if not rows:
            return None
        r = rows[0]
        return Run(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], _loads(r[7]), r[8])

    def runs(self, tenant_id: str, limit: int = 1000, offset: int = 0, session_id: str | None = None) -> list[Run]:
        """The tenant's runs (not deleted), newest first."""
        sql = (
            "SELECT id, tenant_id, session_id, base_model, lora, created, last_request, user_metadata, state "
            "FROM runs WHERE tenant_id = ? AND state != 'deleted'"
        )
        args: tuple[Any, ...] = (tenant_id,)
        if session_id is not None:
            sql += " AND session_id = ?"
            args += (session_id,)
        sql += " ORDER BY created DESC LIMIT ? OFFSET ?"
        rows = self._rows(sql, args + (limit, offset))
        return [Run(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], _loads(r[7]), r[8]) for r in rows]

    def count_runs(self, tenant_id: str, state: str = "active") -> int:
        """How many of the tenant's runs are in ``state``."""
        return self._rows("SELECT COUNT(*) FROM runs WHERE tenant_id = ? AND state = ?", (tenant_id, state))[0][0]

    def set_run_state(self, run_id: str, state: str) -> None:
        """Set a run's state (``active``; ``idle``: parked for idleness, reloaded on use; ``unloaded``;
        ``deleted``)."""
        self._exec("UPDATE runs SET state = ? WHERE id = ?", (state, run_id))

    def touch_run(self, run_id: str) -> None:
        """Record that the run served a request now."""
        self._exec("UPDATE runs SET last_request = ? WHERE id = ?", (time.time(), run_id))

    def unload_all_runs(self) -> int:
        """After a restart no adapter is in memory: mark every active (or idle-parked) run ``unloaded``."""
        return self._exec("UPDATE runs SET state = 'unloaded' WHERE state IN ('active', 'idle')").rowcount

    def oldest_active_request(self) -> float | None:
        """The earliest ``last_request`` of the active runs (``None``: no active run)."""
        return self._rows("SELECT MIN(last_request) FROM runs WHERE state = 'active'")[0][0]

    # -- checkpoints -----------------------------------------------------------------
    def put_checkpoint(self, row: CheckpointRow) -> None:
        """Insert or replace checkpoint metadata (after the files were renamed into place)."""
        self._exec(
            "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.tenant_id,
                row.run_id,
                row.kind,
                row.name,
                row.created,
                row.size_bytes,
                json.dumps(row.user_metadata),
                int(row.has_optimizer),
            ),
        )

    def checkpoint(self, tenant_id: str, run_id: str, kind: str, name: str) -> CheckpointRow | None:
        """The tenant's checkpoint, or ``None`` (also when it belongs to another tenant)."""
        rows = self._rows(
            "SELECT * FROM checkpoints WHERE tenant_id = ? AND run_id = ? AND kind = ? AND name = ?",
            (tenant_id, run_id, kind, name),
        )
        return self._ckpt(rows[0]) if rows else None

    def checkpoints(
        self, tenant_id: str, run_id: str | None = None, limit: int = 10000, offset: int = 0
    ) -> list[CheckpointRow]:
        """The tenant's checkpoints (of one run, or all), oldest first."""
        sql, args = "SELECT * FROM checkpoints WHERE tenant_id = ?", (tenant_id,)
        if run_id is not None:
            sql += " AND run_id = ?"
            args += (run_id,)
        rows = self._rows(sql + " ORDER BY created LIMIT ? OFFSET ?", args + (limit, offset))
        return [self._ckpt(r) for r in rows]

    def set_checkpoint_expiry(self, tenant_id: str, run_id: str, kind: str, name: str, expires: float | None) -> None:
        """Set (epoch seconds) or clear (``None``) a checkpoint's expiry."""
        if expires is None:
            self._exec(
                "DELETE FROM checkpoint_expiry WHERE tenant_id = ? AND run_id = ? AND kind = ? AND name = ?",
                (tenant_id, run_id, kind, name),
            )
        else:
            self._exec(
                "INSERT OR REPLACE INTO checkpoint_expiry VALUES (?, ?, ?, ?, ?)",
                (tenant_id, run_id, kind, name, float(expires)),
            )

    def checkpoint_expiries(self, tenant_id: str) -> dict[tuple[str, str, str], float]:
        """``(run_id, kind, name) -> expiry`` of the tenant's checkpoints that have a TTL."""
        rows = self._rows("SELECT run_id, kind, name, expires FROM checkpoint_expiry WHERE tenant_id = ?", (tenant_id,))
        return {(r[0], r[1], r[2]): r[3] for r in rows}

    def expired_checkpoints(self, now: float) -> list[tuple[str, str, str, str]]:
        """``(tenant_id, run_id, kind, name)`` of every checkpoint whose expiry has passed."""
        rows = self._rows("SELECT tenant_id, run_id, kind, name FROM checkpoint_expiry WHERE expires <= ?", (now,))
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def delete_checkpoint(self, tenant_id: str, run_id: str, kind: str, name: str) -> bool:
        """Delete a checkpoint's metadata; False when the tenant has no such checkpoint."""
        self.set_checkpoint_expiry(tenant_id, run_id, kind, name, None)
        cur = self._exec(
            "DELETE FROM checkpoints WHERE tenant_id = ? AND run_id = ? AND kind = ? AND name = ?",
            (tenant_id, run_id, kind, name),
        )
        return cur.rowcount > 0

    @staticmethod
    def _ckpt(r: tuple[Any, ...]) -> CheckpointRow:
        return CheckpointRow(r[0], r[1], r[2], r[3], r[4], r[5], _loads(r[6]), bool(r[7]))

    # -- sampling sessions ---------------------------------------------------------
    def create_sampling_session(
        self, tenant_id: str, session_id: str, model_path: str | None, base_model: str, *, snapshot: bool = False
    ) -> str:
        """A new sampling session id (``snapshot-...`` for a weight snapshot, else ``sampler-...``)."""
        sid = new_id("snapshot" if snapshot else "sampler")
        self._exec(
            "INSERT INTO sampling_sessions VALUES (?, ?, ?, ?, ?, ?, 1)",
            (sid, tenant_id, session_id, model_path, base_model, time.time()),
        )
        return sid

    def sampling_session(self, tenant_id: str, sampler_id: str) -> dict[str, Any] | None:
        """The tenant's sampling session, or ``None``."""
        rows = self._rows(
            "SELECT id, session_id, model_path, base_model, clients FROM sampling_sessions "
            "WHERE id = ? AND tenant_id = ?",
            (sampler_id, tenant_id),
        )
        if not rows:
            return None
        sid, session_id, model_path, base_model, clients = rows[0]
        return {
            "id": sid,
            "session_id": session_id,
            "model_path": model_path,
            "base_model": base_model,
            "clients": clients,
        }

    def join_sampling_session(self, tenant_id: str, sampler_id: str) -> int | None:
        """Allocate the next client counter of a sampling session."""
        with self._lock:
            cur = self._exec(
                "UPDATE sampling_sessions SET clients = clients + 1 WHERE id = ? AND tenant_id = ?",
                (sampler_id, tenant_id),
            )
            if cur.rowcount == 0:
                return None
            return self._rows("SELECT clients FROM sampling_sessions WHERE id = ?", (sampler_id,))[0][0] - 1

    def sampler_ids(self, tenant_id: str, session_id: str) -> list[str]:
        """Sampling sessions created in one session."""
        rows = self._rows(
            "SELECT id FROM sampling_sessions WHERE tenant_id = ? AND session_id = ? ORDER BY created",
            (tenant_id, session_id),
        )
        return [r[0] for r in rows]

    def idle_runs(self, before: float) -> list[tuple[str, str]]:
        """``(run id, tenant id)`` of the active runs whose last request was before ``before``."""
        return [
            (r[0], r[1])
            for r in self._rows("SELECT id, tenant_id FROM runs WHERE state = 'active' AND last_request < ?", (before,))
        ]

    # -- futures ---------------------------------------------------------------------
    def prune_futures(self, before: float) -> int:
        """Delete finished futures created before ``before``; returns how many."""
        cur = self._exec("DELETE FROM futures WHERE status != 'pending' AND created < ?", (before,))
        return cur.rowcount

    def create_future(self, tenant_id: str, model_id: str | None, kind: str) -> str:
        """Record a pending future; returns its request id."""
        fid = new_id("req")
        self._exec(
            "INSERT INTO futures VALUES (?, ?, ?, ?, 'pending', NULL, NULL, NULL, NULL, ?)",
            (fid, tenant_id, model_id, kind, time.time()),
        )
        return fid

    def finish_future(self, future_id: str, content_type: str, result: bytes) -> None:
        """Store a future's result."""
        self._exec(
            "UPDATE futures SET status = 'done', content_type = ?, result = ? WHERE id = ?",
            (content_type, result, future_id),
        )

    def fail_future(self, future_id: str, error: str, category: str = "user") -> None:
        """Store a future's error (``category``: ``user`` or ``server``)."""
        self._exec(
            "UPDATE futures SET status = 'failed', error = ?, category = ? WHERE id = ?",
            (error, category, future_id),
        )

    def future(self, tenant_id: str, future_id: str) -> FutureRow | None:
        """The tenant's future, or ``None``."""
        rows = self._rows(
            "SELECT id, tenant_id, model_id, kind, status, content_type, result, error, category FROM futures "
            "WHERE id = ? AND tenant_id = ?",
            (future_id, tenant_id),
        )
        return FutureRow(*rows[0]) if rows else None

    def fail_pending_futures(self, message: str) -> int:
        """After a restart: fail every future that was still pending."""
        return self._exec(
            "UPDATE futures SET status = 'failed', error = ?, category = 'server' WHERE status = 'pending'",
            (message,),
        ).rowcount
