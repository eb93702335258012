r"""PPO's critic: a clipped value loss, and the value read-out it trains.

The critic is a causal LM whose value of the state before token ``t`` is one logit of its LM
head at the position that predicts token ``t``: ``V_t = logits[t, value_token_id]``. That row of
the LM head is a linear value head sharing the backbone (train it with a LoRA adapter of its
own: the policy and the critic can be two adapters of one base model). Values and returns are
per-token row fields aligned with the labels, like ``old_logps``.

Clipped value loss (PPO, as TRL's PPOTrainer / OpenRLHF), with returns :math:`R_t`, the values
when the rollout was scored :math:`V^{old}_t` and ``clip_range`` :math:`\epsilon_v`::

    V^{clip}_t = V^{old}_t + clamp(V_t - V^{old}_t, -eps_v, eps_v)
    L_t = 0.5 * max((V_t - R_t)^2, (V^{clip}_t - R_t)^2)

averaged over the trained tokens. Without ``old_values`` (or ``clip_range=None``) it is the plain
``0.5 (V - R)^2``. Metrics: ``value_mse`` (unclipped), ``value_clip_ratio``, ``value_mean``.
"""

from __future__ import annotations

from typing import Any, Mapping

from twinkle.loss._tokens import label_mask, require
from twinkle.loss.base import Loss, LossOutput


def token_values(outputs: Mapping[str, Any], value_token_id: int) -> Any:
    """``[B, T]`` values: the ``value_token_id`` logit at every position (float32)."""
    return outputs["logits"][..., value_token_id].float()


class ValueLoss(Loss):
    """Clipped value loss of a PPO critic (see the module docstring).

    Args:
        value_token_id: the LM-head row read as the value.
        clip_range: ``eps_v`` of the clipped loss; ``None``: unclipped.

    Raises:
        ValueError: ``clip_range <= 0`` or no ``returns`` in the inputs.

    Example::

        model.set_loss("ValueLoss", adapter_name="critic", value_token_id=3, clip_range=0.2)
        model.forward_backward(inputs=[dict(row, returns=r, old_values=v) for ...], adapter_name="critic")
    """

    def __init__(self, value_token_id: int, clip_range: float | None = 0.2) -> None:
        if clip_range is not None and clip_range <= 0:
            raise ValueError(f"ValueLoss: clip_range must be > 0 or None, got {clip_range}")
        self.value_token_id = int(value_token_id)
        self.clip_range = clip_range

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> LossOutput:
        """Sum of the per-token losses and the number of trained tokens."""
        import torch

        mask = label_mask(inputs)
        values = token_values(outputs, self.value_token_id)
        returns = require(
            inputs, "returns", "ValueLoss", "add returns (per token, aligned with labels), e.g. from gae()"
        )
        returns = returns.to(values)
        loss = (values - returns) ** 2
        clipped_frac = torch.zeros_like(loss)
        old = inputs.get("old_values")
        if old is not None and self.clip_range is not None:
            old = old.to(values)
            clipped = old + torch.clamp(values - old, -self.clip_range, self.clip_range)
            clipped_loss = (clipped - returns) ** 2
            clipped_frac = (clipped_loss > loss).float()
            per_token = 0.5 * torch.max(loss, clipped_loss)
        else:
            per_token = 0.5 * loss
        per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
        n = max(int(mask.sum()), 1)
        extra = {
            "value_mse": float((loss.detach() * mask).sum()) / n,
            "value_clip_ratio": float((clipped_frac * mask).sum()) / n,
            "value_mean": float((values.detach() * mask).sum()) / n,
        }
        return LossOutput(loss=per_token.sum(), num_tokens=int(mask.sum()), extra=extra)
