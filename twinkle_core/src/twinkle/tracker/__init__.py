"""Experiment trackers: where a run's metrics go (``initialize(trackers=[...])``, ``TWINKLE_TRACKERS``).

Built in: ``jsonl`` (on by default, ``<run_dir>/metrics.jsonl``), ``tensorboard``, ``wandb``
(offline by default) and ``mlflow`` (local file store by default); the last three need their
library installed. Plugins register more under the ``tracker`` kind. See ``docs/tracking.md``.
"""

from typing import TYPE_CHECKING

_BUILTIN: dict[str, dict[str, str]] = {
    "tracker": {
        "jsonl": "twinkle.tracker.jsonl:JsonlTracker",
        "tensorboard": "twinkle.tracker.tensorboard:TensorBoardTracker",
        "wandb": "twinkle.tracker.wandb:WandbTracker",
        "mlflow": "twinkle.tracker.mlflow:MLflowTracker",
    }
}

_EXPORTS = {
    "JsonlTracker": "twinkle.tracker.jsonl:JsonlTracker",
    "TensorBoardTracker": "twinkle.tracker.tensorboard:TensorBoardTracker",
    "WandbTracker": "twinkle.tracker.wandb:WandbTracker",
    "MLflowTracker": "twinkle.tracker.mlflow:MLflowTracker",
    "read_metrics": "twinkle.tracker.jsonl:read_metrics",
    "resolve_run_dir": "twinkle.tracker.runs:resolve_run_dir",
    "tracker_names": "twinkle.tracker.runs:tracker_names",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names resolve lazily (PEP 562)
    from twinkle.tracker.base import Tracker as Tracker
    from twinkle.tracker.jsonl import JsonlTracker as JsonlTracker
    from twinkle.tracker.jsonl import read_metrics as read_metrics
    from twinkle.tracker.mlflow import MLflowTracker as MLflowTracker
    from twinkle.tracker.runs import resolve_run_dir as resolve_run_dir
    from twinkle.tracker.runs import tracker_names as tracker_names
    from twinkle.tracker.tensorboard import TensorBoardTracker as TensorBoardTracker
    from twinkle.tracker.wandb import WandbTracker as WandbTracker
else:
    from twinkle._kinds import kind_module

    __getattr__, __dir__ = kind_module(__name__, _EXPORTS)
