"""MLflowTracker: an MLflow run, in a local file store under ``<run_dir>/mlruns`` by default.

Browse with ``mlflow ui --backend-store-uri <run_dir>/mlruns``. ``MLFLOW_TRACKING_URI`` (or
``tracker_options={"mlflow": {"tracking_uri": ...}}``) points it at a server instead.
MLflow 3 refuses file stores unless ``MLFLOW_ALLOW_FILE_STORE=true``; the tracker sets that
for its own default store only (``mlflow-skinny`` supports no other local store).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

from twinkle.tracker.base import Tracker, scalars
from twinkle.tracker.tensorboard import require


class MLflowTracker(Tracker):
    """Logs ``<source>/<name>`` metrics at the optimizer step with ``MlflowClient.log_batch``.

    Args:
        run_dir: the run's directory.
        tracking_uri: default ``$MLFLOW_TRACKING_URI``, else ``file://<run_dir>/mlruns``.
        experiment: experiment name (default ``$MLFLOW_EXPERIMENT_NAME`` or ``twinkle``).
        run_name: default the run directory's name.
    """

    name = "mlflow"

    def __init__(
        self,
        run_dir: str | Path,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
        **options: Any,
    ) -> None:
        require("mlflow", "mlflow-skinny", self.name)
        super().__init__(run_dir, **options)
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "twinkle"
        self.run_name = run_name or self.run_dir.name
        self.client: Any = None
        self.run_id: str | None = None
        self._count = 0

    def _start(self) -> None:
        from mlflow.tracking import MlflowClient

        if self.tracking_uri is None:
            store = self.ensure_run_dir() / "mlruns"
            self.tracking_uri = store.resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = self.client.get_experiment_by_name(self.experiment)
        experiment_id = (
            experiment.experiment_id if experiment is not None else self.client.create_experiment(self.experiment)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id

    def log(self, source: str, step: int | None, metrics: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        values = scalars(source, metrics)
        if not values:
            return
        if self.client is None:
            self._start()
        self._count += 1
        now = int(time.time() * 1000)
        at = int(step if step is not None else self._count)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, at) for k, v in values.items()])

    def close(self) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id)
        self.client = None
