"""The Loss protocol: how a model backend turns a batch and its outputs into a loss.

Contract (shared by every backend and every loss, SFT or RL):

``loss(inputs, outputs) -> LossOutput``

* ``inputs``: the collated batch from an InputProcessor (tensors on the model's device).
  ``shift_labels`` ``[B, T]`` holds, at position ``t``, the token to predict from the
  logits at ``t`` (-100 = not trained); it is already shifted and never crosses the
  boundary of a packed sequence. Per-token extras a user passed per row (``old_logps``,
  ``ref_logps``, aligned with the row's labels) are shifted the same way and padded with
  0; per-row scalars (``advantages``, ``rewards``) are broadcast to ``[B, T]``.
  ``row_ids`` ``[B, T]`` says which input row each position belongs to (-1 = padding).
* ``outputs``: a dict with ``logits`` ``[B, T, V]`` and, computed lazily through
  :func:`token_logps`, the log-probabilities of ``shift_labels``. A
  :class:`~twinkle.data_format.output.ModelOutput` may compute those (and the summed
  cross-entropy) itself without full logits: its ``label_logps`` / ``label_cross_entropy_sum``
  return them, or ``None`` when the logits are the way.

``LossOutput.loss`` is a **sum** over the micro-batch (a scalar tensor with a graph);
``LossOutput.num_tokens`` is what that sum should be divided by. The model backend adds
both up over a gradient-accumulation window (and over data-parallel ranks) and divides
the accumulated gradient by the total ``num_tokens`` just before the optimizer step, so
N micro-batches give exactly the gradient of one batch N times as large. A loss that is
already a mean returns ``num_tokens=1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from twinkle.data_format.output import ModelOutput


@dataclass
class LossOutput:
    """What a :class:`Loss` returns.

    Args:
        loss: scalar tensor, the sum of the per-token (or per-sequence) losses.
        num_tokens: the normalizer of ``loss`` (int or scalar tensor).
        extra: numbers to report as metrics (e.g. ``{"kl": 0.01}``), already normalized.
    """

    loss: Any
    num_tokens: Any
    extra: dict[str, float] | None = None


class Loss:
    """Base of losses: ``loss(inputs, outputs) -> LossOutput`` (see the module docstring).

    Subclass it and implement :meth:`__call__`; register it with
    ``register("loss", "MyLoss", "my_pkg.loss:MyLoss")`` and select it with
    ``model.set_loss("MyLoss")``.

    Example::

        class SumOfSquares(Loss):
            def __call__(self, inputs, outputs):
                mask = inputs["shift_labels"] != -100
                logps = token_logps(inputs, outputs)
                return LossOutput(loss=(logps**2 * mask).sum(), num_tokens=mask.sum())
    """

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> LossOutput:
        """Compute the loss of one micro-batch.

        Args:
            inputs: the collated batch (see the module docstring).
            outputs: the model's outputs (``logits``).

        Returns:
            A :class:`LossOutput` whose ``loss`` is a sum and ``num_tokens`` its normalizer.
        """
        raise TypeError(f"{type(self).__name__} must implement __call__(inputs, outputs) -> LossOutput")


def token_logps(inputs: Mapping[str, Any], outputs: Any) -> Any:
    """Log-probability of each ``shift_labels`` token, ``[B, T]`` float32 (0 where the label is -100).

    Cached in ``outputs['token_logps']`` so several losses/metrics share one computation.
    From the output's own :meth:`~twinkle.data_format.output.ModelOutput.label_logps` where it
    has them (a backend's fast path without full logits), else from ``outputs['logits']``.
    """
    cached = outputs.get("token_logps") if hasattr(outputs, "get") else None
    if cached is not None:
        return cached
    import torch

    labels = inputs["shift_labels"]
    # the backend's own (the fast path: from hidden states in chunks, no full logits), if it has one
    fused = outputs.label_logps(labels) if isinstance(outputs, ModelOutput) else None
    if fused is not None:
        if isinstance(outputs, dict):
            outputs["token_logps"] = fused
        return fused
    logits = outputs["logits"]
    mask = labels != -100
    safe = labels.masked_fill(~mask, 0)
    logits32 = logits.float()
    picked = torch.gather(logits32, -1, safe.unsqueeze(-1)).squeeze(-1)
    logps = torch.where(mask, picked - torch.logsumexp(logits32, dim=-1), 0.0)
    if isinstance(outputs, dict):
        outputs["token_logps"] = logps
    return logps
