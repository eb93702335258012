r"""Distillation: GKD (generalized JSD between teacher and student token distributions).

On each trained position (``shift_labels != -100``) with student distribution :math:`p_S`
and teacher distribution :math:`p_T` (both at temperature ``tau``), and the mixture
:math:`M = \beta p_T + (1 - \beta) p_S`::

    JSD_beta = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)      (0 < beta < 1)
    beta = 0:  KL(p_T || p_S)   (forward KL, "supervised KD")
    beta = 1:  KL(p_S || p_T)   (reverse KL)

The loss is the sum over trained positions, normalized by their count.

Teacher signal, one of (tensors aligned with the student's logits, i.e. position ``t``
predicts ``shift_labels[t]``):

* ``teacher_logits`` ``[B, T, V]``: the full teacher distribution (any ``beta``);
* ``teacher_topk_ids`` + ``teacher_topk_logps`` ``[B, T, K]``: the teacher's top-``K`` tokens;
  the teacher is renormalized over them and the forward KL restricted to that support is
  used: ``sum_k p_T(k) (log p_T(k) - log p_S(k))`` (``beta`` must be 0).

Pass them in an already collated batch (a dict of tensors given to ``forward_backward``),
or compute them from a teacher model in your loop.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from twinkle.loss._tokens import label_mask
from twinkle.loss.base import Loss, LossOutput


def generalized_jsd(student_logits: Any, teacher_logits: Any, beta: float, temperature: float = 1.0) -> Any:
    """Per-position generalized JSD ``[...]`` between two logit tensors ``[..., V]`` (module docstring)."""
    import torch
    import torch.nn.functional as F

    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
    kl_t = (t.exp() * (t - m)).sum(-1)
    kl_s = (s.exp() * (s - m)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


class GKDLoss(Loss):
    """Generalized knowledge distillation loss (module docstring).

    Args:
        beta: JSD interpolation in ``[0, 1]`` (0 = forward KL, 1 = reverse KL).
        temperature: softmax temperature for both distributions.

    Raises:
        ValueError: bad options, or no teacher signal in the inputs.

    Example::

        loss = GKDLoss(beta=0.5)
        out = loss({"shift_labels": labels, "teacher_logits": t_logits}, {"logits": s_logits})
    """

    def __init__(self, beta: float = 0.5, temperature: float = 1.0) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"GKDLoss: beta must be in [0, 1], got {beta}")
        if temperature <= 0:
            raise ValueError(f"GKDLoss: temperature must be > 0, got {temperature}")
        self.beta, self.temperature = beta, temperature

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> LossOutput:
        """Sum of per-position divergences over trained positions; normalizer: their count."""
        import torch
        import torch.nn.functional as F

        logits = outputs["logits"]
        mask = label_mask(inputs)
        if inputs.get("teacher_logits") is not None:
            teacher = inputs["teacher_logits"].to(logits.device)
            if teacher.shape != logits.shape:
                raise ValueError(
                    f"GKDLoss: teacher_logits {tuple(teacher.shape)} != student logits {tuple(logits.shape)}"
                )
            per_pos = generalized_jsd(logits, teacher, self.beta, self.temperature)
        elif inputs.get("teacher_topk_ids") is not None and inputs.get("teacher_topk_logps") is not None:
            if self.beta != 0:
                raise ValueError("GKDLoss: top-k teacher log-probabilities support only beta=0 (forward KL)")
            ids = inputs["teacher_topk_ids"].to(logits.device).long()
            t = torch.log_softmax(inputs["teacher_topk_logps"].to(logits.device).float() / self.temperature, dim=-1)
            s_full = F.log_softmax(logits.float() / self.temperature, dim=-1)
            s = torch.gather(s_full, -1, ids)
            per_pos = (t.exp() * (t - s)).sum(-1)
        else:
            raise ValueError(
                "GKDLoss needs the teacher in the inputs: 'teacher_logits' [B, T, V], or 'teacher_topk_ids' and "
                "'teacher_topk_logps' [B, T, K], aligned with the student's logits"
            )
        per_pos = torch.where(mask, per_pos, torch.zeros_like(per_pos))
        n = int(mask.sum())
        return LossOutput(
            loss=per_pos.sum(), num_tokens=n, extra={"divergence": float(per_pos.detach().sum()) / max(n, 1)}
        )
