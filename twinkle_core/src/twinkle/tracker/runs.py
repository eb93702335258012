"""The run directory and the trackers of a runtime (``twinkle.initialize(run_dir=, trackers=)``).

Run directory, first that applies:

1. ``initialize(run_dir=PATH)``;
2. ``TWINKLE_RUN_DIR=PATH``;
3. ``./twinkle_runs/<YYYYmmdd-HHMMSS>`` in the working directory (``-2``, ``-3`` ... appended
   when that name exists).

It is created only when a tracker first writes, so a run that reports no metric leaves none.

Trackers, first that applies: ``initialize(trackers=[...])`` (names, or Tracker objects);
``TWINKLE_TRACKERS=jsonl,tensorboard``; ``["jsonl"]``. The list is exactly what runs: keep
``jsonl`` in it for ``twinkle plot``; ``trackers=[]`` or ``TWINKLE_TRACKERS=none`` turns
tracking off. Under torchrun only rank 0 tracks (``RANK`` unset or ``0``).
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from twinkle.runtime import Runtime
    from twinkle.tracker.base import Tracker

DEFAULT_TRACKERS = ("jsonl",)
RUNS_ROOT = "twinkle_runs"
_OFF = {"", "none", "off", "0", "false"}


def resolve_run_dir(run_dir: str | os.PathLike | None = None) -> Path:
    """The run directory (not created): the argument, ``$TWINKLE_RUN_DIR``, or a new timestamped one."""
    if run_dir is not None:
        return Path(run_dir)
    env = os.environ.get("TWINKLE_RUN_DIR")
    if env:
        return Path(env)
    root = Path.cwd() / RUNS_ROOT
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = root / stamp, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{stamp}-{n}"
    return candidate


def tracker_names(trackers: Iterable[Any] | str | None = None) -> list[Any]:
    """The trackers asked for: the argument, ``$TWINKLE_TRACKERS`` (comma-separated), or ``["jsonl"]``."""
    if trackers is None:
        env = os.environ.get("TWINKLE_TRACKERS")
        if env is None:
            return list(DEFAULT_TRACKERS)
        trackers = env
    if isinstance(trackers, str):
        if trackers.strip().lower() in _OFF:
            return []
        trackers = [t.strip() for t in trackers.split(",") if t.strip()]
    return list(trackers)


def open_trackers(
    runtime: Runtime,
    trackers: Iterable[Any] | str | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Tracker]:
    """Resolve each name through the registry (kind ``tracker``) and build it on ``runtime.run_dir``.

    Raises:
        ComponentNotFoundError: an unknown tracker name (the message lists the registered ones).
        ImportError: a tracker whose library is missing (the message names the pip install).
    """
    from twinkle.tracker.base import Tracker

    if os.environ.get("RANK", "0") != "0":
        return []
    options = dict(options or {})
    unknown_options = set(options) - {t for t in tracker_names(trackers) if isinstance(t, str)}
    if unknown_options:
        warnings.warn(
            f"tracker_options for trackers that are not selected: {', '.join(sorted(unknown_options))}", stacklevel=3
        )
    opened: list[Tracker] = []
    for entry in tracker_names(trackers):
        if isinstance(entry, Tracker):
            opened.append(entry)
            continue
        # resolved, not runtime.create(): the runtime has not started, so no component_created yet
        factory = runtime.registry.resolve("tracker", entry)
        opened.append(factory(runtime.run_dir, **dict(options.get(entry, {}))))
    return opened


def feed(runtime: Runtime, source: str, step: int | None, metrics: Mapping[str, Any]) -> None:
    """Hand one emission to every tracker of ``runtime``; a failing tracker warns once and is dropped."""
    for tracker in list(getattr(runtime, "trackers", ())):
        try:
            tracker.log(source, step, metrics)
        except Exception as exc:  # noqa: BLE001 - a tracker must not stop training
            warnings.warn(
                f"tracker {type(tracker).__name__} failed and is switched off for this run: "
                f"{type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
            runtime.trackers.remove(tracker)


def close(runtime: Runtime) -> None:
    """Close every tracker of ``runtime`` (errors warn)."""
    trackers, runtime.trackers = list(getattr(runtime, "trackers", ())), []
    for tracker in trackers:
        try:
            tracker.close()
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"tracker {type(tracker).__name__} failed to close: {exc}", RuntimeWarning, stacklevel=2)
