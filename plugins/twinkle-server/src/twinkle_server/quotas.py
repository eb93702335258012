"""A tenant's quotas: their figures, the per-tenant request rate, and the error that answers a breach.

:class:`~twinkle_server.state.ServerState` charges every request against them (``charge``,
``charge_request``); the adapter ledger both APIs share, checked against ``max_adapters``, is
:class:`~twinkle_server.admission.AdmissionLedger`. What a breach looks like on the wire is
:class:`QuotaExceeded`'s ``status`` (403 over a limit, 413 over the tokens of one request, 429 over
the rate, 503 for a full server) and ``retry_after``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

__all__ = ["Limits", "QuotaExceeded", "RateLimiter"]


class QuotaExceeded(PermissionError):
    """A per-tenant or server limit was reached; ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 403, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass
class Limits:
    """A tenant's effective quotas."""

    max_adapters: int
    max_tokens_per_request: int
    requests_per_minute: int


class RateLimiter:
    """A token bucket per tenant (capacity = one minute of requests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, tenant_id: str, per_minute: int) -> bool:
        """Spend one request; False when the tenant is over its rate."""
        return self.wait(tenant_id, per_minute) == 0.0

    def wait(self, tenant_id: str, per_minute: int) -> float:
        """Spend one request and return 0, or return the seconds until one is available (nothing spent)."""
        now = time.monotonic()
        per_minute = max(1, per_minute)
        with self._lock:
            tokens, last = self._buckets.get(tenant_id, (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - last) * per_minute / 60.0)
            if tokens < 1.0:
                self._buckets[tenant_id] = (tokens, now)
                return (1.0 - tokens) * 60.0 / per_minute
            self._buckets[tenant_id] = (tokens - 1.0, now)
            return 0.0
