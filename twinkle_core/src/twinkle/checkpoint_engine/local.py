"""LocalCheckpointEngine: copy weights from a model into a sampler in the same process."""

from __future__ import annotations

import time
from typing import Any

from twinkle.checkpoint_engine.base import CheckpointEngine, model_weights
from twinkle.progress import progress


class LocalCheckpointEngine(CheckpointEngine):
    """Sync full weights or one adapter's LoRA tensors from a model into a sampler in this process.

    The model is a TwinkleModel (``get_state_dict``) or a plain ``torch.nn.Module``; the sampler
    implements :meth:`~twinkle.sampler.base.Sampler.update_weights`. Only LoRA tensors move when
    ``adapter_name`` is given (kilobytes to megabytes instead of the whole model).

    Metrics returned by :meth:`sync` (and accumulated in :attr:`history`): ``sync_seconds``
    (wall time), ``sync_tensors``, ``sync_bytes``.

    Example::

        engine = LocalCheckpointEngine()
        model.clip_grad_and_step()
        metrics = engine.sync(model, sampler, adapter_name="default")
    """

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def sync(self, model: Any, sampler: Any, adapter_name: str | None = None) -> dict[str, float]:
        """Copy weights; see :meth:`CheckpointEngine.sync`.

        Raises:
            TypeError: the sampler has no ``update_weights``.
            ValueError: a full sync of a model that trains LoRA adapters (pass ``adapter_name``).
        """
        if not callable(getattr(sampler, "update_weights", None)):
            raise TypeError(f"{type(sampler).__name__} has no update_weights(); it is not a Sampler")
        start = time.perf_counter()
        with progress(total=2, desc="weight sync", unit="B", unit_scale=True) as bar:
            weights, peft_config = model_weights(model, adapter_name)
            size = sum(t.numel() * t.element_size() for t in weights.values())
            bar.total = 2 * size  # gathered from the model, then loaded into the sampler
            bar.update(size)
            loaded = sampler.update_weights(weights, adapter_name=adapter_name, peft_config=peft_config)
            bar.update(size)
        seconds = time.perf_counter() - start
        metrics = {
            "sync_seconds": seconds,
            "sync_tensors": float(loaded if isinstance(loaded, int) else len(weights)),
            "sync_bytes": float(size),
        }
        self.history.append(metrics)
        return metrics
