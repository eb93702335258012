"""WandbTracker: a Weights & Biases run, offline by default, under ``<run_dir>/wandb``.

Offline mode writes the run to disk and needs no account or network; upload it later with
``wandb sync <run_dir>/wandb/offline-run-*``. Set ``WANDB_MODE=online`` (or
``tracker_options={"wandb": {"mode": "online"}}``) to stream instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from twinkle.tracker.base import Tracker, scalars
from twinkle.tracker.tensorboard import require


class WandbTracker(Tracker):
    """Logs ``<source>/<name>`` keys at the optimizer step (``wandb.log(..., step=)``).

    W&B needs steps that never go back: an emission whose step is lower than one already
    logged (e.g. a second adapter's counter) is logged without a step, at W&B's own counter.

    Args:
        run_dir: the run's directory; W&B writes ``<run_dir>/wandb/``.
        project: W&B project (default ``$WANDB_PROJECT`` or ``twinkle``).
        mode: ``offline`` (default, or ``$WANDB_MODE``), ``online`` or ``disabled``.
        **init_kwargs: anything else ``wandb.init`` takes (``entity``, ``tags``, ``config`` ...).
    """

    name = "wandb"

    def __init__(self, run_dir: str | Path, project: str | None = None, mode: str | None = None, **init_kwargs: Any):
        require("wandb", "wandb", self.name)
        super().__init__(run_dir)
        self.project = project or os.environ.get("WANDB_PROJECT") or "twinkle"
        self.mode = mode or os.environ.get("WANDB_MODE") or "offline"
        self.init_kwargs = init_kwargs
        self._run: Any = None
        self._last_step = -1

    def log(self, source: str, step: int | None, metrics: Mapping[str, Any]) -> None:
        values = scalars(source, metrics)
        if not values:
            return
        if self._run is None:
            import wandb

            self.ensure_run_dir()
            kwargs = {"name": self.run_dir.name, **self.init_kwargs}
            self._run = wandb.init(project=self.project, mode=self.mode, dir=str(self.run_dir), **kwargs)
        if step is not None and step >= self._last_step:
            self._last_step = step
            self._run.log(values, step=int(step))
        else:
            self._run.log(values)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
