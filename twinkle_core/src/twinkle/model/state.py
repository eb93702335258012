"""Per-adapter training state and the small numeric helpers of a training step.

One job: the data an adapter (or the full model) trains with, :class:`AdapterState`, and
the helpers that read numbers back from the GPU without stalling it (:class:`HostScalars`)
or reshape the results of a forward (:func:`per_row_logps`). No torch import at module
import; no behaviour beyond bookkeeping.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from twinkle.loss.base import Loss

#: The state key of full-parameter training (no adapter).
FULL_MODEL = "__full__"


@dataclass
class AdapterState:
    """Everything one adapter (or the full model) trains with.

    Attributes:
        name: the adapter name (``FULL_MODEL`` for full-parameter training).
        params: the parameters this state's optimizer updates.
        gradient_accumulation_steps: micro-batches per optimizer step.
        global_step: optimizer steps taken.
        micro_step: micro-batches accumulated in the current window.
        window_tokens: sum of ``LossOutput.num_tokens`` in the current window (this rank).
    """

    name: str
    params: list[Any]
    loss: Loss
    processor: Any
    gradient_accumulation_steps: int = 1
    optimizer: Any = None
    lr_scheduler: Any = None
    template: Any = None
    train_metrics: list[Any] = field(default_factory=list)
    eval_metrics: list[Any] = field(default_factory=list)
    global_step: int = 0
    micro_step: int = 0
    window_tokens: float = 0.0
    grads_final: bool = False
    last_grad_norm: float | None = None
    last_loss: tuple[float, float] = (0.0, 0.0)  # (loss sum, tokens) of the last backward
    pending: tuple[Any, Any] | None = None
    pending_loss: Any = None
    # reporting since the last calculate_metric
    report: dict[str, float] = field(default_factory=dict)
    eval_report: dict[str, float] = field(default_factory=dict)
    report_started: float | None = None

    def reset_report(self, is_training: bool = True) -> None:
        """Start a new reporting period (training or evaluation): zero the sums, reset the metrics."""
        if is_training:
            self.report = {"loss_sum": 0.0, "loss_tokens": 0.0, "input_tokens": 0.0, "busy_s": 0.0}
            self.report_started = None
            for metric in self.train_metrics:
                metric.reset()
        else:
            self.eval_report = {"loss_sum": 0.0, "loss_tokens": 0.0}
            for metric in self.eval_metrics:
                metric.reset()


class HostScalars:
    """Scalars (numbers or 0-d tensors) read on the host without making it wait for later GPU work.

    CUDA tensors are copied into pinned memory behind an event when this object is built;
    :meth:`values` waits for that event only, not for whatever was queued after it (a backward).

    Example::

        host = HostScalars({"loss": loss})
        loss.backward()                  # queued
        host.values()["loss"]            # waits for the forward only
    """

    def __init__(self, scalars: Mapping[str, Any]) -> None:
        self._values: dict[str, float] = {}
        self._event: Any = None
        cuda = {}
        for key, value in scalars.items():
            if getattr(value, "is_cuda", False):
                cuda[key] = value
            else:
                self._values[key] = float(value.detach() if hasattr(value, "detach") else value)
        if cuda:
            import torch

            device = next(iter(cuda.values())).device
            stacked = torch.stack([v.detach().reshape(()).to(device, torch.float64) for v in cuda.values()])
            self._buffer = torch.empty(stacked.shape, dtype=torch.float64, pin_memory=True)
            self._buffer.copy_(stacked, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(device))
            self._keys = list(cuda)

    def values(self) -> dict[str, float]:
        """The floats (waits for the copies started in the constructor)."""
        if self._event is not None:
            self._event.synchronize()
            self._values.update(zip(self._keys, self._buffer.tolist()))
            self._event = None
        return self._values


def by_device_and_dtype(tensors: Sequence[Any]) -> list[list[Any]]:
    """``tensors`` grouped by (device, dtype), the unit a multi-tensor kernel takes."""
    groups: dict[tuple[Any, Any], list[Any]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """``torch.no_grad()`` without importing torch at module import."""
    import torch

    with torch.no_grad():
        yield


def per_row_logps(batch: Mapping[str, Any], logps: Any) -> list[list[float]]:
    """Per input row, the log-prob of each label (aligned with the row's labels; first position 0.0)."""
    values = logps.detach().float().cpu()
    row_ids = batch.get("row_ids")
    if row_ids is None:  # a batch of tensors given as is: one sequence per row, right-padded if masked
        mask = batch.get("attention_mask")
        lengths = mask.sum(-1).tolist() if mask is not None else [values.shape[1]] * values.shape[0]
        return [[0.0, *values[r, : int(n) - 1].tolist()] for r, n in enumerate(lengths)]
    rows = row_ids.cpu()
    result: list[list[float]] = []
    if rows.shape[0] == 1 and int(rows.max()) > 0:
        flat_rows, flat_vals = rows[0], values[0]
        count = int(flat_rows.max()) + 1
        offset = 0
        for r in range(count):
            n = int((flat_rows == r).sum())
            result.append([0.0, *flat_vals[offset : offset + n - 1].tolist()])
            offset += n
        return result
    for r in range(rows.shape[0]):
        n = int((rows[r] >= 0).sum())
        result.append([0.0, *values[r, : n - 1].tolist()])
    return result
