"""The TwinkleModel protocol: what every model backend implements with the same semantics.

A user's loop is written against these methods only, so it runs unchanged on
TransformersModel (transformers + peft) and MegatronModel (twinkle-megatron), in one
process, under torchrun, on Ray actors or behind the HTTP server. Each method carries
its dispatch/collect metadata (:func:`twinkle.dispatch.remote`) so launchers know how to
spread it over the component's DeviceMesh.

Shared conventions:

* ``inputs`` is a DataLoader batch: ``list[dict]`` rows with ``input_ids``, ``labels``
  (-100 = not trained), optionally ``position_ids`` (packed rows) and extra per-row fields
  for the loss (``advantages``, ``old_logps``, ``ref_logps`` ...), see
  :mod:`twinkle.loss.base`.
* ``adapter_name`` selects a LoRA adapter (default: the last one added; the base model
  when none was added). Every adapter has its own optimizer, scheduler, loss, template,
  processor, metrics and gradient-accumulation window.
* Gradient accumulation: losses are sums; the accumulated gradient is divided by the
  window's total token count (over all data-parallel ranks) before the step, so N
  micro-batches equal one batch N times as large.
"""

from __future__ import annotations

from typing import Any

from twinkle.component import Component
from twinkle.dispatch import remote


def _missing(self: Any, method: str) -> TypeError:
    return TypeError(f"{type(self).__name__} does not implement TwinkleModel.{method}; subclasses must override it")


class TwinkleModel(Component):
    """Base of model backends (TransformersModel, MegatronModel); see the module docstring.

    Every method below is part of the protocol; backends override all of them with the
    same names, arguments and semantics.
    """

    # -- compute -----------------------------------------------------------------
    @remote(dispatch="slice_dp", collect="mean")
    def forward(self, inputs: Any, *, adapter_name: str | None = None, **kwargs: Any) -> Any:
        """Run the model with gradients on ``inputs``; keep the outputs for :meth:`calculate_loss`.

        Returns:
            A :class:`~twinkle.data_format.output.ModelOutput` with ``logits``.
        """
        raise _missing(self, "forward")

    @remote(dispatch="slice_dp", collect="mean")
    def forward_only(self, inputs: Any, *, adapter_name: str | None = None, **kwargs: Any) -> Any:
        """Run the model without gradients (evaluation, reference/old log-probs for RL).

        Returns:
            A ModelOutput with ``logps`` (per row, log-prob of each label, aligned with
            ``labels``), ``loss`` and ``num_tokens``.
        """
        raise _missing(self, "forward_only")

    @remote(dispatch="slice_dp", collect="mean")
    def forward_backward(self, inputs: Any, *, adapter_name: str | None = None, **kwargs: Any) -> Any:
        """forward + calculate_loss + backward on one micro-batch; gradients accumulate.

        Returns:
            A ModelOutput with ``loss`` (this micro-batch, normalized) and ``num_tokens``.
        """
        raise _missing(self, "forward_backward")

    @remote(dispatch="all", collect="mean")
    def calculate_loss(self, *, adapter_name: str | None = None, **kwargs: Any) -> Any:
        """Apply the adapter's Loss to the last :meth:`forward`'s outputs; returns the normalized loss."""
        raise _missing(self, "calculate_loss")

    @remote(dispatch="all", collect="none")
    def backward(self, *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Back-propagate the last :meth:`calculate_loss` and add it to the accumulation window."""
        raise _missing(self, "backward")

    # -- optimization ------------------------------------------------------------
    @remote(dispatch="all", collect="first")
    def clip_grad_norm(self, max_grad_norm: float = 1.0, norm_type: float = 2.0, **kwargs: Any) -> float:
        """Clip the accumulated gradients; returns the total norm before clipping."""
        raise _missing(self, "clip_grad_norm")

    @remote(dispatch="all", collect="none")
    def step(self, **kwargs: Any) -> None:
        """One optimizer step with the accumulated gradients."""
        raise _missing(self, "step")

    @remote(dispatch="all", collect="none")
    def zero_grad(self, **kwargs: Any) -> None:
        """Drop the accumulated gradients and start a new accumulation window."""
        raise _missing(self, "zero_grad")

    @remote(dispatch="all", collect="none")
    def lr_step(self, **kwargs: Any) -> None:
        """Advance the LR scheduler by one optimizer step."""
        raise _missing(self, "lr_step")

    @remote(dispatch="all", collect="first")
    def clip_grad_and_step(self, max_grad_norm: float = 1.0, norm_type: float = 2.0, **kwargs: Any) -> Any:
        """At the end of an accumulation window: clip, step, zero_grad, lr_step; otherwise nothing.

        Returns:
            ``{"stepped": bool, "grad_norm": ..., "lr": ..., "step": ...}``.
        """
        raise _missing(self, "clip_grad_and_step")

    # -- configuration -----------------------------------------------------------
    @remote(dispatch="all", collect="first")
    def set_loss(self, loss_cls: Any, **kwargs: Any) -> None:
        """Set the adapter's Loss: a registered name, a class, or an instance."""
        raise _missing(self, "set_loss")

    @remote(dispatch="all", collect="first")
    def set_optimizer(self, optimizer_cls: Any, **kwargs: Any) -> None:
        """Build the adapter's optimizer: a registered name (any torch.optim name), a class, or a factory."""
        raise _missing(self, "set_optimizer")

    @remote(dispatch="all", collect="first")
    def set_lr_scheduler(self, scheduler_cls: Any, **kwargs: Any) -> None:
        """Build the adapter's LR scheduler on its optimizer (name, class or factory)."""
        raise _missing(self, "set_lr_scheduler")

    @remote(dispatch="all", collect="first")
    def set_template(self, template_cls: Any, **kwargs: Any) -> None:
        """Set the adapter's Template (encodes un-encoded rows, provides the tokenizer)."""
        raise _missing(self, "set_template")

    @remote(dispatch="all", collect="first")
    def set_processor(self, processor_cls: Any, **kwargs: Any) -> None:
        """Set the adapter's InputProcessor (padded or padding-free collate)."""
        raise _missing(self, "set_processor")

    @remote(dispatch="all", collect="first")
    def add_metric(self, metric_cls: Any, **kwargs: Any) -> None:
        """Add a Metric to the adapter (name, class or instance)."""
        raise _missing(self, "add_metric")

    @remote(dispatch="all", collect="first")
    def calculate_metric(self, is_training: bool = True, **kwargs: Any) -> dict[str, Any]:
        """The metrics since the last call (loss, grad_norm, lr, tokens_per_s, token_acc, step); resets them."""
        raise _missing(self, "calculate_metric")

    @remote(dispatch="all", collect="first")
    def add_adapter_to_model(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        """Add a named LoRA adapter (a peft config or dict) and make it the default."""
        raise _missing(self, "add_adapter_to_model")

    # -- state -------------------------------------------------------------------
    @remote(dispatch="all", collect="first")
    def save(self, output_dir: str, **kwargs: Any) -> str:
        """Write weights (adapter or full, HF/PEFT format) and training state atomically; returns the path."""
        raise _missing(self, "save")

    @remote(dispatch="all", collect="first")
    def load(self, checkpoint_dir: str, **kwargs: Any) -> None:
        """Load adapter or full weights written by :meth:`save` (or by transformers/peft)."""
        raise _missing(self, "load")

    @remote(dispatch="all", collect="first")
    def resume_from_checkpoint(self, checkpoint_dir: str, **kwargs: Any) -> dict[str, Any]:
        """Load weights, optimizer, scheduler, RNG and step counters; returns the saved trainer state."""
        raise _missing(self, "resume_from_checkpoint")

    @remote(dispatch="all", collect="first")
    def get_state_dict(self, **kwargs: Any) -> dict[str, Any]:
        """The adapter's (or the full model's) weights as CPU tensors, by name."""
        raise _missing(self, "get_state_dict")
