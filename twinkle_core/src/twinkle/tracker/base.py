"""The Tracker protocol: receive every metrics emission of a run and record it somewhere.

A tracker is a component of kind ``tracker`` (``register("tracker", "name", "pkg.mod:Cls")``),
selected by name in ``twinkle.initialize(trackers=[...])`` or ``TWINKLE_TRACKERS``. Core
feeds it from the ``twinkle_metrics_emitted`` hook (``twinkle/tracker/hooks.py``) and closes
it from ``twinkle_runtime_stopped``. See ``docs/tracking.md``.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any, Mapping


class Tracker:
    """Base of experiment trackers (JSONL, TensorBoard, Weights & Biases, MLflow, yours).

    Subclasses take ``run_dir`` (the run's directory, created on first use by
    :meth:`ensure_run_dir`) and keyword options (``initialize(tracker_options={name: {...}})``),
    and implement :meth:`log` and, if they hold resources, :meth:`close`. Construction must be
    cheap and write nothing: open files or start clients on the first :meth:`log`, so a run
    that never reports a metric leaves no directory behind. A missing optional library should
    raise ``ImportError`` from ``__init__`` naming the ``pip install`` that fixes it.

    Example::

        class PrintTracker(Tracker):
            def log(self, source, step, metrics):
                print(source, step, dict(metrics))
    """

    #: The name users select it by (set by subclasses; informative only).
    name: str = ""

    def __init__(self, run_dir: str | Path, **options: Any) -> None:
        self.run_dir = Path(run_dir)
        self.options = dict(options)

    def ensure_run_dir(self) -> Path:
        """Create the run directory (and parents) and return it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return self.run_dir

    def log(self, source: str, step: int | None, metrics: Mapping[str, Any]) -> None:
        """Record one emission: ``source`` (``"train"``, ``"eval/default"``, ``"rl"``), the
        optimizer ``step`` it belongs to (None if unknown) and ``metrics`` (do not mutate)."""
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release resources (called once, when the runtime shuts down)."""


def scalar(value: Any) -> float | None:
    """``value`` as a float if it is a real number (Python, numpy or 0-d tensor), else None."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        try:
            return float(value.item())
        except (TypeError, ValueError):
            return None
    return None


def scalars(source: str, metrics: Mapping[str, Any], *, finite: bool = False) -> dict[str, float]:
    """``{"<source>/<name>": float}`` for the real-number entries of ``metrics``.

    ``finite=True`` drops NaN and infinities (for libraries that reject them).
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        number = scalar(value)
        if number is None or (finite and not math.isfinite(number)):
            continue
        out[f"{source}/{key}" if source else str(key)] = number
    return out
