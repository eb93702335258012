"""TensorBoardTracker: scalars in TensorBoard event files under ``<run_dir>/tensorboard``.

Needs the ``tensorboard`` package only (no torch or TensorFlow): events are written with its
own ``EventFileWriter``. View with ``tensorboard --logdir twinkle_runs``.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any, Mapping

from twinkle.tracker.base import Tracker, scalars


def require(module: str, package: str, tracker: str) -> None:
    """ImportError naming the install command when ``module`` is missing."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"the {tracker!r} tracker needs the {package!r} package, which is not installed. "
            f"Install it with: pip install {package}"
        )


class TensorBoardTracker(Tracker):
    """One scalar per metric, tagged ``<source>/<name>`` (``train/loss``, ``eval/loss``), at the
    optimizer step (or a running count when the emission has none).

    Args:
        run_dir: the run's directory; events go to ``<run_dir>/<subdir>``.
        subdir: default ``tensorboard``.
        flush_secs: how often the writer flushes (it also flushes on close).
    """

    name = "tensorboard"

    def __init__(self, run_dir: str | Path, subdir: str = "tensorboard", flush_secs: int = 10, **options: Any) -> None:
        require("tensorboard", "tensorboard", self.name)
        super().__init__(run_dir, **options)
        self.logdir = self.run_dir / subdir
        self.flush_secs = flush_secs
        self._writer: Any = None
        self._count = 0

    def log(self, source: str, step: int | None, metrics: Mapping[str, Any]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        if self._writer is None:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self.logdir.mkdir(parents=True, exist_ok=True)
            self._writer = EventFileWriter(str(self.logdir), flush_secs=self.flush_secs)
        values = scalars(source, metrics)
        if not values:
            return
        self._count += 1
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])
        self._writer.add_event(
            Event(wall_time=time.time(), step=int(step if step is not None else self._count), summary=summary)
        )

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
