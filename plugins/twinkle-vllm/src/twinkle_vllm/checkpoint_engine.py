"""VLLMCheckpointEngine: weight sync into a VLLMSampler in the same process (colocated training).

The model and the vLLM engine share the process (and, on a GPU, the device). A sync streams
the model's tensors straight into vLLM's in-place reload (no second copy of the model), or
stages only the LoRA tensors of one adapter. A sleeping sampler is woken in two stages,
weights first, then the KV cache, the order that keeps peak memory lowest when training
and sampling take turns on one GPU.
"""

from __future__ import annotations

import time
from typing import Any

from twinkle.checkpoint_engine.base import CheckpointEngine, model_weights


class VLLMCheckpointEngine(CheckpointEngine):
    """Sync full weights or one adapter's LoRA tensors from a model into a colocated sampler.

    Args:
        sleep_after_sync: put the sampler back to sleep after syncing when it was asleep before.

    Metrics returned by :meth:`sync` (and kept in :attr:`history`): ``sync_seconds`` (wall
    time of the whole sync), ``sync_tensors``, ``sync_bytes``, ``sync_gather_seconds`` (reading
    the model's state dict) and ``sync_load_seconds`` (loading into the sampler).

    Example::

        engine = VLLMCheckpointEngine()
        sampler.sleep()                      # train with the memory
        model.forward_backward(inputs=batch); model.clip_grad_and_step()
        metrics = engine.sync(model, sampler, adapter_name="default")   # wakes the sampler
        print(metrics["sync_seconds"])
    """

    def __init__(self, sleep_after_sync: bool = False) -> None:
        self.sleep_after_sync = sleep_after_sync
        self.history: list[dict[str, float]] = []

    def sync(self, model: Any, sampler: Any, adapter_name: str | None = None) -> dict[str, float]:
        """Copy weights from ``model`` into ``sampler``; see :meth:`CheckpointEngine.sync`.

        Raises:
            TypeError: ``sampler`` has no ``update_weights``.
            ValueError: a full sync of a model that trains LoRA adapters (pass ``adapter_name``).
        """
        if not callable(getattr(sampler, "update_weights", None)):
            raise TypeError(f"{type(sampler).__name__} has no update_weights(); it is not a Sampler")
        start = time.perf_counter()
        was_sleeping = bool(getattr(sampler, "is_sleeping", False))
        if was_sleeping:
            sampler.wake_up(tags=["weights"])
        weights, peft_config = model_weights(model, adapter_name)
        gathered = time.perf_counter()
        loaded = sampler.update_weights(weights, adapter_name=adapter_name, peft_config=peft_config)
        loaded_at = time.perf_counter()
        if was_sleeping:
            sampler.wake_up(tags=["kv_cache"])
            if getattr(sampler, "is_sleeping", False):
                sampler.wake_up()
            if self.sleep_after_sync:
                sampler.sleep()
        metrics = {
            "sync_seconds": time.perf_counter() - start,
            "sync_gather_seconds": gathered - start,
            "sync_load_seconds": loaded_at - gathered,
            "sync_tensors": float(loaded if isinstance(loaded, int) else len(weights)),
            "sync_bytes": float(sum(t.numel() * t.element_size() for t in weights.values())),
        }
        self.history.append(metrics)
        return metrics
