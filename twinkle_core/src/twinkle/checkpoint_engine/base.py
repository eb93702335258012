"""The CheckpointEngine protocol: move trained weights from a model into a sampler.

After an optimizer step the sampler must generate with the new policy. A checkpoint
engine copies either the full weights or only the LoRA tensors of one adapter:

``engine.sync(model, sampler, adapter_name=None) -> dict`` returns metrics, at least
``sync_seconds`` (wall time of the sync), ``sync_tensors`` and ``sync_bytes``.

Core ships :class:`~twinkle.checkpoint_engine.local.LocalCheckpointEngine` (model and
sampler in the same process); twinkle-vllm provides engines that ship tensors to vLLM
workers. All of them call the sampler's
:meth:`~twinkle.sampler.base.Sampler.update_weights`.

Example::

    engine = LocalCheckpointEngine()
    metrics = engine.sync(model, sampler, adapter_name="default")
    print(metrics["sync_seconds"])
"""

from __future__ import annotations

from typing import Any

from twinkle.component import Component


class CheckpointEngine(Component):
    """Moves trained weights (full or LoRA) from a model into a sampler.

    Subclasses implement :meth:`sync`. A Component, so that in http mode the engine is
    built on the server next to the model and sampler it syncs.
    """

    def sync(self, model: Any, sampler: Any, adapter_name: str | None = None) -> dict[str, float]:
        """Copy the weights of ``model`` (or only adapter ``adapter_name``'s LoRA tensors) into ``sampler``.

        Args:
            model: a TwinkleModel (anything with ``get_state_dict``) or a ``torch.nn.Module``.
            sampler: a Sampler (anything with ``update_weights``).
            adapter_name: ``None`` syncs the full (merged base) weights; a name syncs that LoRA adapter.

        Returns:
            Metrics: ``sync_seconds``, ``sync_tensors``, ``sync_bytes``.
        """
        raise TypeError(f"{type(self).__name__} must implement CheckpointEngine.sync")
