"""JsonlTracker: one JSON line per metrics emission in ``<run_dir>/metrics.jsonl`` (on by default)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any, Mapping

from twinkle.tracker.base import Tracker, scalar

METRICS_FILE = "metrics.jsonl"


class JsonlTracker(Tracker):
    """Append ``{"time", "source", "step", "metrics"}`` lines to ``<run_dir>/metrics.jsonl``.

    The file is opened on the first emission and flushed after every line, so ``twinkle plot``
    and ``tail -f`` see a run while it trains. Numbers stay numbers (numpy and 0-d tensors
    become floats), strings stay strings, anything else is written as its ``str()``.
    Read it back with :func:`read_metrics`.

    Args:
        run_dir: the run's directory.
        filename: the file name inside ``run_dir`` (default ``metrics.jsonl``).
    """

    name = "jsonl"

    def __init__(self, run_dir: str | Path, filename: str = METRICS_FILE, **options: Any) -> None:
        super().__init__(run_dir, **options)
        self.path = self.run_dir / filename
        self._file: IO[str] | None = None

    def log(self, source: str, step: int | None, metrics: Mapping[str, Any]) -> None:
        if self._file is None:
            self.ensure_run_dir()
            self._file = self.path.open("a", encoding="utf-8")
        values: dict[str, Any] = {}
        for key, value in metrics.items():
            number = scalar(value)
            if number is not None and not isinstance(value, bool):
                values[str(key)] = int(value) if isinstance(value, int) else number
            elif isinstance(value, (str, bool)) or value is None:
                values[str(key)] = value
            else:
                values[str(key)] = str(value)
        record = {"time": time.time(), "source": source, "step": step, "metrics": values}
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a run directory or the file itself); a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written while we read
                continue
    return records
