"""Stability records for ``stable_reinforce``: what a sampler recorded, by ``sequence_id``.

A sampler asked with ``record_stability_info=True`` records each sampled sequence's per-token
log-probabilities under the sequence's ``sequence_id`` (``<request id>:<index>``, the ids the
SDK attaches to ``SampledSequence``). A ``stable_reinforce`` training request names those
sequences through its datums' provenance (``loss_fn_input_spans``); the service turns the spans
into the loss's ``logprobs`` (the sampling policy) and ``stability_mask`` (which target tokens
were sampled). Records belong to the tenant that sampled them and live one day after sampling
or their last use in training, as Tinker documents; a memory bound drops the oldest first.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Sequence

#: Tinker's documented lifetime: one day after sampling, restarted by each training use.
RECORD_TTL_S = 24 * 3600.0
#: At most this many recorded log-probabilities are held (float32: 4 bytes each).
MAX_RECORDED_TOKENS = 20_000_000


class StabilityError(ValueError):
    """A provenance span naming an unknown, expired or too short recorded sequence."""


class StabilityRecords:
    """Recorded sampled sequences, per tenant and ``sequence_id``, with a TTL and a memory bound."""

    def __init__(self, ttl_s: float = RECORD_TTL_S, max_tokens: int = MAX_RECORDED_TOKENS) -> None:
        self.ttl_s = ttl_s
        self.max_tokens = max_tokens
        self._records: OrderedDict[tuple[str, str], tuple[Any, float]] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._records)

    def record(self, tenant_id: str, sequence_id: str, logprobs: Sequence[float]) -> None:
        """Keep one sampled sequence's per-token log-probabilities."""
        import numpy as np

        arr = np.asarray(logprobs, dtype=np.float32).reshape(-1)
        with self._lock:
            self._drop((tenant_id, sequence_id))
            self._records[(tenant_id, sequence_id)] = (arr, time.monotonic() + self.ttl_s)
            self._tokens += arr.size
            self._expire()

    def lookup(self, tenant_id: str, sequence_id: str) -> Any:
        """The recorded log-probabilities; restarts the record's lifetime.

        Raises:
            StabilityError: unknown or expired (or another tenant's) sequence.
        """
        with self._lock:
            self._expire()
            hit = self._records.get((tenant_id, sequence_id))
            if hit is None:
                raise StabilityError(
                    f"sequence_id {sequence_id!r} has no stability record: sample it with record_stability_info=True "
                    "in this session (records last one day after sampling or their last training use)"
                )
            self._records[(tenant_id, sequence_id)] = (hit[0], time.monotonic() + self.ttl_s)
            self._records.move_to_end((tenant_id, sequence_id))
            return hit[0]

    def fill(self, tenant_id: str, spans: Sequence[tuple[str, str, int, int]], length: int) -> tuple[Any, Any]:
        """``(logprobs, stability_mask)`` of one datum from its ``loss_fn_input_spans``.

        ``spans`` are ``(kind, sequence_id, offset, length)`` runs tiling the datum's target tokens;
        ``sampled`` runs take the recorded log-probabilities, ``prompt`` runs are masked out.

        Raises:
            StabilityError: spans that do not tile the targets, or name unknown/too short sequences.
        """
        import numpy as np

        q = np.zeros(length, dtype=np.float32)
        mask = np.zeros(length, dtype=np.float32)
        pos = 0
        for kind, sequence_id, offset, n in spans:
            if n < 0 or offset < 0 or pos + n > length:
                raise StabilityError(f"provenance spans overrun the datum's {length} target tokens")
            if kind == "sampled":
                recorded = self.lookup(tenant_id, sequence_id)
                if offset + n > recorded.size:
                    raise StabilityError(
                        f"span [{offset}, {offset + n}) of sequence {sequence_id!r} is past its {recorded.size} "
                        "sampled tokens"
                    )
                q[pos : pos + n] = recorded[offset : offset + n]
                mask[pos : pos + n] = 1.0
            pos += n
        if pos != length:
            raise StabilityError(f"provenance spans cover {pos} of the datum's {length} target tokens")
        return q, mask

    def _drop(self, key: tuple[str, str]) -> None:
        old = self._records.pop(key, None)
        if old is not None:
            self._tokens -= old[0].size

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, (_, expires) in self._records.items() if expires <= now]:
            self._drop(key)
        while self._tokens > self.max_tokens and self._records:
            self._drop(next(iter(self._records)))
