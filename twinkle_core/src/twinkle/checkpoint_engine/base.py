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


def model_weights(model: Any, adapter_name: str | None = None) -> tuple[dict[str, Any], Any]:
    """What a checkpoint engine sends: ``(name -> tensor, the adapter's peft config or None)`` of ``model``.

    Args:
        model: a TwinkleModel (``get_state_dict``) or a ``torch.nn.Module`` (optionally a peft model).
        adapter_name: ``None``: the full weights. A name: only that adapter's LoRA tensors
            (PEFT's saved names) and its ``LoraConfig``.

    Returns:
        The weights (detached tensors of a plain module) and the adapter's peft config
        (``None`` for full weights, or when a TwinkleModel does not expose one).

    Raises:
        KeyError: a plain peft model without adapter ``adapter_name``.
        ValueError: the full weights of a TwinkleModel that trains LoRA adapters (its base
            weights do not change: sync an adapter by name).

    Example::

        weights, lora_config = model_weights(model, adapter_name="default")
    """
    if callable(getattr(model, "get_state_dict", None)):
        if adapter_name is None:
            adapters = getattr(model, "adapter_names", None)
            adapters = adapters() if callable(adapters) else adapters
            if adapters:
                raise ValueError(
                    f"sync: the model trains LoRA adapters {list(adapters)}; sync one with adapter_name=... (its "
                    "base weights do not change), or sync full weights before adding adapters"
                )
        weights = model.get_state_dict(adapter_name=adapter_name)
        peft_config = None
        if adapter_name is not None:
            peft = getattr(model, "model", None)
            peft_config = getattr(peft, "peft_config", {}).get(adapter_name)
        return weights, peft_config
    # a plain torch module (optionally a peft model)
    if adapter_name is not None:
        from peft import get_peft_model_state_dict

        if adapter_name not in getattr(model, "peft_config", {}):
            raise KeyError(f"the model has no LoRA adapter {adapter_name!r}")
        weights = get_peft_model_state_dict(model, adapter_name=adapter_name)
        return {k: v.detach() for k, v in weights.items()}, model.peft_config[adapter_name]
    return {k: v.detach() for k, v in model.state_dict().items()}, None
