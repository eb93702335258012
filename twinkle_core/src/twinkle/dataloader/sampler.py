"""The order rows are read in (seeded shuffling per epoch) and the retry rule for rows that fail to load."""

from __future__ import annotations

import logging
import random
from typing import Any, Callable

logger = logging.getLogger("twinkle.dataloader")


def epoch_order(num_rows: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """The row order of ``epoch``: ``0..n-1``, or a permutation that depends only on ``(seed, epoch)``."""
    order = list(range(num_rows))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


class RowLoadError(RuntimeError):
    """A row and its replacements all failed to load."""


class RetrySampler:
    """Fetches rows by position in an epoch's order; a row that raises is replaced by the next one.

    The replacement for position ``p`` is the row at ``p + 1``, ``p + 2``... (wrapping), so
    every process picks the same replacement and batch boundaries never move, which keeps
    resuming exact.

    Args:
        fetch: ``index -> row`` (usually ``dataset.__getitem__``).
        max_retries: replacements tried per row before :class:`RowLoadError`.

    Attributes:
        skipped: rows that failed and were replaced so far.
    """

    def __init__(self, fetch: Callable[[int], Any], max_retries: int = 3) -> None:
        self.fetch = fetch
        self.max_retries = max_retries
        self.skipped = 0

    def get(self, order: list[int], position: int) -> Any:
        """The row at ``position`` of ``order``, or a replacement if it fails to load.

        Raises:
            RowLoadError: ``max_retries + 1`` rows in a row failed; the last error is chained.
        """
        last: Exception | None = None
        n = len(order)
        for attempt in range(self.max_retries + 1):
            index = order[(position + attempt) % n]
            try:
                return self.fetch(index)
            except Exception as exc:  # any loading failure: skip, count, log, bounded
                last = exc
                self.skipped += 1
                logger.warning("row %d failed to load (%s: %s); using the next row", index, type(exc).__name__, exc)
        raise RowLoadError(
            f"{self.max_retries + 1} consecutive rows failed to load from position {position} "
            f"(last: {type(last).__name__}: {last}); fix the data or raise max_retries"
        ) from last
