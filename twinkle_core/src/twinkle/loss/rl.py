r"""Policy-gradient losses for RL: GRPO / PPO-clip and its variants (DAPO, Dr. GRPO, GSPO, CISPO).

Inputs (per the :mod:`twinkle.loss.base` contract, built by the InputProcessor from the rows
given to ``model.forward_backward``):

* ``shift_labels`` ``[B, T]``: the completion tokens (-100 elsewhere);
* ``advantages``: one float per row (broadcast to its tokens), e.g. from ``GRPOAdvantage``;
* ``old_logps`` (optional): the behaviour policy's per-token log-probabilities, aligned with
  the row's labels (``SampledSequence.input_feature`` carries them). Missing = on-policy
  (``old = logp.detach()``, ratio 1, the gradient of REINFORCE with a baseline);
* ``ref_logps`` (when ``beta > 0``): the reference policy's per-token log-probabilities,
  from ``model.forward_only`` with the adapter disabled.

Notation: for token :math:`t` of sequence :math:`i`, :math:`\ell_{i,t} = \log\pi_\theta(y_{i,t})`,
:math:`r_{i,t} = \exp(\ell_{i,t} - \ell^{old}_{i,t})`, advantage :math:`A_i`, :math:`|y_i|` tokens.

PPO-clip per-token loss (``GRPOLoss``, ``DAPOLoss``, ``DrGRPOLoss``)::

    L_{i,t} = -min(r_{i,t} A_i, clip(r_{i,t}, 1 - eps_low, 1 + eps_high) A_i) + beta * KL3_{i,t}

k3 KL to the reference (Schulman's unbiased, always positive estimator)::

    KL3_{i,t} = exp(ref_{i,t} - l_{i,t}) - (ref_{i,t} - l_{i,t}) - 1

Aggregation (how per-token losses become the loss; the model backend divides the window's
summed loss by the window's summed normalizer):

* ``"sequence"`` (GRPO): ``mean_i [ (1/|y_i|) sum_t L_{i,t} ]``
* ``"token"`` (DAPO, PPO): ``sum_{i,t} L_{i,t} / sum_i |y_i|``
* ``"fixed"`` (Dr. GRPO): ``sum_{i,t} L_{i,t} / (N * max_completion_length)``

GSPO (``importance_level="sequence"``) replaces the token ratio by the sequence's geometric
mean ratio ``s_i = exp((1/|y_i|) sum_t (l_{i,t} - l^{old}_{i,t}))``.

CISPO clips and detaches the importance weight and keeps every token's gradient::

    L_{i,t} = -sg(min(r_{i,t}, max_ratio)) * A_i * l_{i,t}

Rollout correction (``rollout_correction=...``, see :mod:`twinkle.loss.rollout_correction`):
``old_logps`` are then read as the *sampler's* log-probabilities, the PPO anchor becomes the
trainer's ``proximal_logps`` (``model.forward_only`` on the rows before the update; missing =
the current policy, detached: one update per batch), and the per-token policy loss is
multiplied by the truncated (TIS) or masked (MIS) weight ``exp(proximal - old)``::

    L_{i,t} = w_{i,t} * PPO_{i,t} + beta * KL3_{i,t}

On-policy distillation (``teacher_kl_coef > 0``; rows carry ``teacher_logps``, the teacher's
log-probabilities of the student's own sampled tokens, e.g. from ``Sampler.compute_logps``): the
per-token reverse KL ``KL(pi_theta || pi_teacher)``, estimated on the student's samples by
``l_{i,t} - teacher_{i,t}``, enters as a per-token advantage (``advantages`` may then be omitted)::

    A_{i,t} = A_i - teacher_kl_coef * (sg(l_{i,t}) - teacher_{i,t})

so the policy gradient is ``coef * (l - teacher) * grad l``, the gradient of the reverse KL
(as tinker-cookbook's on-policy distillation). Metric ``teacher_kl``: the mean of ``l - teacher``.

These match TRL's ``GRPOTrainer`` loss types ``grpo`` / ``dapo`` (on one micro-batch; TRL
normalizes DAPO by the generation batch) / ``dr_grpo`` / GSPO / ``cispo`` (tested in
``tests/trl_parity``).
"""

from __future__ import annotations

from typing import Any, Mapping

from twinkle.loss._tokens import label_mask, per_sequence_count, per_sequence_sum, require, sequence_index
from twinkle.loss.base import Loss, LossOutput, token_logps
from twinkle.loss.rollout_correction import RolloutCorrection

_AGGREGATIONS = ("sequence", "token", "fixed")
_LEVELS = ("token", "sequence")


class GRPOLoss(Loss):
    """GRPO / PPO-clip policy loss with optional clip-higher, k3 KL and sequence-level ratios.

    See the module docstring for the formulas.

    Args:
        epsilon: lower clip range ``eps_low`` (ratio clipped below at ``1 - epsilon``).
        epsilon_high: upper clip range (``1 + epsilon_high``); defaults to ``epsilon``. DAPO's
            clip-higher uses a larger value (0.28).
        beta: weight of the k3 KL to the reference (needs ``ref_logps``); 0 disables it.
        aggregation: ``"sequence"``, ``"token"`` or ``"fixed"`` (see the module docstring).
        importance_level: ``"token"`` (PPO/GRPO) or ``"sequence"`` (GSPO).
        max_completion_length: the constant of ``aggregation="fixed"``.
        delta: optional upper bound on the unclipped ratio (two-sided clipping); ``None`` disables it.
        kl_ratio_correction: multiply the k3 KL by the (differentiable) importance ratio, which makes its
            gradient the unbiased reverse-KL gradient (DeepSeek-V3.2; TRL's ``use_bias_correction_kl``).
        rollout_correction: ``None`` (off), ``"token_truncate"``, ``"token_mask"``, ``"sequence_truncate"``
            or ``"sequence_mask"``: importance weights for the trainer/sampler mismatch (see
            :mod:`twinkle.loss.rollout_correction`); adds the ``rollout_*`` metrics.
        rollout_clip_max: upper threshold of the correction weight (``None``: none). TRL's default 3.0.
        rollout_clip_min: lower threshold (``None``: none); IcePop masks outside [0.5, 5].
        teacher_kl_coef: weight of the per-token reverse KL to a teacher (needs ``teacher_logps``); 0 disables
            it. See the module docstring (on-policy distillation).

    Raises:
        ValueError: bad options, or a needed field (``advantages``, ``ref_logps``) missing from the inputs.

    Example::

        model.set_loss("GRPOLoss", epsilon=0.2, beta=0.04)
        rows = [dict(seq.input_feature, advantages=a) for seq, a in zip(sequences, advantages)]
        model.forward_backward(inputs=rows)
    """

    def __init__(
        self,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        aggregation: str = "sequence",
        importance_level: str = "token",
        max_completion_length: int | None = None,
        delta: float | None = None,
        kl_ratio_correction: bool = False,
        rollout_correction: str | None = None,
        rollout_clip_max: float | None = 3.0,
        rollout_clip_min: float | None = None,
        teacher_kl_coef: float = 0.0,
    ) -> None:
        name = type(self).__name__
        if aggregation not in _AGGREGATIONS:
            raise ValueError(f"{name}: aggregation={aggregation!r} must be one of {_AGGREGATIONS}")
        if importance_level not in _LEVELS:
            raise ValueError(f"{name}: importance_level={importance_level!r} must be one of {_LEVELS}")
        if aggregation == "fixed" and not max_completion_length:
            raise ValueError(
                f"{name}: aggregation='fixed' (Dr. GRPO) needs max_completion_length (SamplingParams.max_tokens)"
            )
        if epsilon < 0 or (epsilon_high is not None and epsilon_high < 0):
            raise ValueError(f"{name}: epsilon and epsilon_high must be >= 0")
        if beta < 0:
            raise ValueError(f"{name}: beta must be >= 0, got {beta}")
        self.epsilon_low = epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.beta = beta
        self.aggregation = aggregation
        self.importance_level = importance_level
        self.max_completion_length = max_completion_length
        self.delta = delta
        self.kl_ratio_correction = kl_ratio_correction
        if teacher_kl_coef < 0:
            raise ValueError(f"{name}: teacher_kl_coef must be >= 0, got {teacher_kl_coef}")
        self.teacher_kl_coef = teacher_kl_coef
        self.rollout_correction = (
            None
            if rollout_correction is None
            else RolloutCorrection(rollout_correction, rollout_clip_max, rollout_clip_min)
        )

    # -- pieces ----------------------------------------------------------------------------
    def policy_term(self, coef: Any, advantages: Any, logps: Any) -> tuple[Any, dict[str, Any]]:
        """Per-token policy loss from the importance weight ``coef``; returns (loss, metric tensors)."""
        import torch

        clipped = torch.clamp(coef, 1 - self.epsilon_low, 1 + self.epsilon_high)
        if self.delta is not None:
            coef = torch.clamp(coef, max=self.delta)
        loss = -torch.min(coef * advantages, clipped * advantages)
        low = (coef < 1 - self.epsilon_low) & (advantages < 0)
        high = (coef > 1 + self.epsilon_high) & (advantages > 0)
        return loss, {"clip_ratio": (low | high).float()}

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> LossOutput:
        """The loss of one micro-batch (sum) and its normalizer; metrics ``kl``, ``clip_ratio``, ``ratio``."""
        import torch

        who = type(self).__name__
        logps = token_logps(inputs, outputs)
        mask = label_mask(inputs)
        teacher_kl = None
        if self.teacher_kl_coef:
            teacher = require(
                inputs,
                "teacher_logps",
                who,
                "add teacher_logps (per token, aligned with labels), e.g. teacher_sampler.compute_logps(rows), "
                "or set teacher_kl_coef=0",
            ).to(logps)
            teacher_kl = (logps.detach() - teacher) * mask  # reverse KL estimate on the student's samples
            advantages = inputs.get("advantages")
            advantages = torch.zeros_like(logps) if advantages is None else advantages.to(logps)
            advantages = advantages - self.teacher_kl_coef * teacher_kl
        else:
            advantages = require(
                inputs, "advantages", who, "add advantages=<float> to every row (e.g. from GRPOAdvantage)"
            ).to(logps)
        old = inputs.get("old_logps")
        old = None if old is None else old.to(logps)
        index, num_seqs = sequence_index(inputs, mask)
        proximal = inputs.get("proximal_logps")
        proximal = None if proximal is None else proximal.to(logps)
        rollout_weight, rollout_metrics = None, {}
        if self.rollout_correction is not None:
            # old_logps are the sampler's; the PPO anchor is the trainer's proximal policy
            sampler = require(
                inputs,
                "old_logps",
                who,
                "rollout_correction needs the sampler's log-probabilities (sample with logprobs)",
            ).to(logps)
            anchor = logps.detach() if proximal is None else proximal
            rollout_weight, rollout_metrics = self.rollout_correction(anchor, sampler, mask, index, num_seqs)
            old = anchor
        elif proximal is not None:
            old = proximal
        old = logps.detach() if old is None else old
        log_ratio = (logps - old) * mask
        if self.importance_level == "sequence":
            counts = per_sequence_count(mask, index, num_seqs).clamp(min=1.0)
            seq_log_ratio = per_sequence_sum(log_ratio, mask, index, num_seqs) / counts
            log_w = seq_log_ratio[index.clamp(min=0)] * mask
        else:
            log_w = log_ratio
        coef = torch.exp(log_w)
        per_token, metrics = self.policy_term(coef, advantages, logps)
        if rollout_weight is not None:
            per_token = per_token * rollout_weight
        if self.beta:
            ref = require(
                inputs,
                "ref_logps",
                who,
                "add ref_logps (per token, aligned with labels) from model.forward_only with the adapter disabled, "
                "or set beta=0",
            ).to(logps)
            diff = (ref - logps) * mask
            kl = torch.exp(diff) - diff - 1
            if self.kl_ratio_correction:  # DeepSeek-V3.2: unbiased reverse-KL gradient (TRL's default)
                kl = kl * coef
            per_token = per_token + self.beta * kl
            metrics["kl"] = kl.detach()
        per_token = torch.where(mask, per_token, torch.zeros_like(per_token))

        if self.aggregation == "sequence":
            counts = per_sequence_count(mask, index, num_seqs).clamp(min=1.0)
            loss = (per_sequence_sum(per_token, mask, index, num_seqs) / counts).sum()
            normalizer = num_seqs
        elif self.aggregation == "token":
            loss = per_token.sum()
            normalizer = int(mask.sum())
        else:
            loss = per_token.sum()
            normalizer = num_seqs * int(self.max_completion_length or 1)
        n_tok = max(int(mask.sum()), 1)
        extra = {k: float((v * mask).sum()) / n_tok for k, v in metrics.items()}
        extra["ratio"] = float((coef.detach() * mask).sum()) / n_tok
        extra.update(rollout_metrics)
        if teacher_kl is not None:
            extra["teacher_kl"] = float(teacher_kl.sum()) / n_tok
        return LossOutput(loss=loss, num_tokens=normalizer, extra=extra)


class PPOLoss(GRPOLoss):
    """PPO-clip with token-level aggregation (``sum L / #tokens``); see :class:`GRPOLoss`."""

    def __init__(self, epsilon: float = 0.2, aggregation: str = "token", **kwargs: Any) -> None:
        super().__init__(epsilon=epsilon, aggregation=aggregation, **kwargs)


class DAPOLoss(GRPOLoss):
    """DAPO: clip-higher (``epsilon_high=0.28``) and token-level aggregation; see :class:`GRPOLoss`."""

    def __init__(
        self, epsilon: float = 0.2, epsilon_high: float = 0.28, aggregation: str = "token", **kwargs: Any
    ) -> None:
        super().__init__(epsilon=epsilon, epsilon_high=epsilon_high, aggregation=aggregation, **kwargs)


class DrGRPOLoss(GRPOLoss):
    """Dr. GRPO: ``sum L / (N * max_completion_length)`` (no length bias); pair with
    ``GRPOAdvantage(scale="none")``. See :class:`GRPOLoss`."""

    def __init__(self, max_completion_length: int, aggregation: str = "fixed", **kwargs: Any) -> None:
        super().__init__(max_completion_length=max_completion_length, aggregation=aggregation, **kwargs)


class GSPOLoss(GRPOLoss):
    """GSPO: sequence-level importance ratio (geometric mean over tokens), clip 3e-4 / 4e-4; see :class:`GRPOLoss`."""

    def __init__(
        self,
        epsilon: float = 3e-4,
        epsilon_high: float = 4e-4,
        importance_level: str = "sequence",
        aggregation: str = "sequence",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            epsilon=epsilon,
            epsilon_high=epsilon_high,
            importance_level=importance_level,
            aggregation=aggregation,
            **kwargs,
        )


class CISPOLoss(GRPOLoss):
    """CISPO: ``L = -sg(min(r, max_ratio)) * A * logp``, token-level aggregation; see the module docstring.

    Args:
        max_ratio: upper bound of the (detached) importance weight.
    """

    def __init__(self, max_ratio: float = 5.0, aggregation: str = "token", **kwargs: Any) -> None:
        if max_ratio <= 0:
            raise ValueError(f"CISPOLoss: max_ratio must be > 0, got {max_ratio}")
        super().__init__(aggregation=aggregation, **kwargs)
        self.max_ratio = max_ratio

    def policy_term(self, coef: Any, advantages: Any, logps: Any) -> tuple[Any, dict[str, Any]]:
        """``-sg(min(r, max_ratio)) * A * logp``."""
        import torch

        weight = torch.clamp(coef, max=self.max_ratio).detach()
        clipped = ((coef > self.max_ratio) & (advantages > 0)).float()
        return -weight * advantages * logps, {"clip_ratio": clipped}
