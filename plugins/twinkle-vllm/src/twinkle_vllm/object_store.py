"""ObjectStoreCheckpointEngine: weight sync between ray-mode components, model actors to sampler actors.

In ray mode the model and the sampler are proxies whose ranks are Ray actors (often on
different DeviceGroups). Syncing through :class:`~twinkle.checkpoint_engine.local.LocalCheckpointEngine`
would pull the weights into the driver and push them out again. This engine instead asks the
model for its state dict with ``get_state_dict.remote(...)`` (the result stays in Ray's
object store) and passes that reference to the sampler's ``update_weights``: the sampler
actor fetches the tensors from the model actor's object store directly; the driver only
sends the call and the (small) LoRA config.

Example::

    model = TransformersModel(model_id=..., remote_group="model", device_mesh=DeviceMesh.from_sizes(dp_size=2))
    sampler = VLLMSampler(model_dir, enable_lora=True, remote_group="sampler")
    model.add_adapter_to_model("default", lora)
    engine = ObjectStoreCheckpointEngine()
    metrics = engine.sync(model, sampler, adapter_name="default", peft_config=lora)
    print(metrics["sync_seconds"])
"""

from __future__ import annotations

import time
from typing import Any

from twinkle.checkpoint_engine.base import CheckpointEngine


class ObjectStoreCheckpointEngine(CheckpointEngine):
    """Sync full weights or one adapter's LoRA tensors from a ray-mode model into a ray-mode sampler.

    The tensors travel model actor -> Ray object store -> sampler actor(s), never through the
    driver. Both arguments must be ray-mode proxies (components created with ``remote_group=``).

    Metrics returned by :meth:`sync` (and kept in :attr:`history`): ``sync_seconds`` (wall time
    seen by the driver: the model's ``get_state_dict`` plus the sampler's load), ``sync_tensors``
    (tensors loaded by the sampler). ``sync_bytes`` is not reported: the driver never holds the
    tensors, so it does not know their size without fetching them.

    Example::

        engine = ObjectStoreCheckpointEngine()
        engine.sync(model, sampler, adapter_name="default", peft_config=lora_config)
    """

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def sync(
        self, model: Any, sampler: Any, adapter_name: str | None = None, peft_config: Any = None
    ) -> dict[str, float]:
        """Move ``model``'s weights (or adapter ``adapter_name``'s LoRA tensors) into ``sampler``.

        Args:
            model: a ray-mode model proxy (``TransformersModel(..., remote_group=...)``).
            sampler: a ray-mode sampler proxy (``VLLMSampler(..., remote_group=...)``).
            adapter_name: ``None`` syncs the full weights; a name syncs that adapter's LoRA tensors.
            peft_config: the adapter's ``LoraConfig`` (or dict): needed the first time, when the
                sampler creates the adapter (the driver built it, so it passes it here).

        Returns:
            ``{"sync_seconds": ..., "sync_tensors": ...}``.

        Raises:
            TypeError: ``model`` or ``sampler`` is not a ray-mode proxy (in one process use
                VLLMCheckpointEngine or LocalCheckpointEngine).
        """
        get_state_dict = getattr(getattr(model, "get_state_dict", None), "remote", None)
        update_weights = getattr(sampler, "update_weights", None)
        if get_state_dict is None or getattr(update_weights, "remote", None) is None:
            raise TypeError(
                "ObjectStoreCheckpointEngine.sync needs a ray-mode model and sampler (created with remote_group=... "
                f"under twinkle.initialize(mode='ray')), got {type(model).__name__} and {type(sampler).__name__}; "
                "for components in this process use VLLMCheckpointEngine or LocalCheckpointEngine"
            )
        start = time.perf_counter()
        weights = get_state_dict(adapter_name=adapter_name)  # stays in the model actor's object store
        loaded = update_weights(weights, adapter_name=adapter_name, peft_config=peft_config)
        metrics = {"sync_seconds": time.perf_counter() - start, "sync_tensors": float(loaded)}
        self.history.append(metrics)
        return metrics
