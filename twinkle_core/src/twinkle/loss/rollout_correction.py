r"""Rollout correction: importance weights for the trainer/sampler mismatch (TIS and MIS).

The sampler (vLLM, a stale copy of the policy in an async loop, another kernel) does not
produce exactly the log-probabilities the trainer computes for the same tokens. With
:math:`\ell^{prox}` the trainer's log-probability under the weights that sampled (the
*proximal* policy; on-policy it is the current policy, detached) and :math:`\ell^{samp}` the
sampler's own (``old_logps``, what every sampler writes into its rows), the correction weight
is the truncated or masked ratio

* token level: :math:`\rho_{i,t} = \exp(\ell^{prox}_{i,t} - \ell^{samp}_{i,t})`;
* sequence level: :math:`\rho_i = \exp(\sum_t (\ell^{prox}_{i,t} - \ell^{samp}_{i,t}))` (a product
  of the token ratios, the same weight for every token of the sequence);

and then, with thresholds ``clip_min`` / ``clip_max`` (``None`` = unbounded):

* ``*_truncate`` (TIS): :math:`w = \mathrm{clamp}(\rho, C_{min}, C_{max})`;
* ``*_mask`` (MIS; IcePop-style with ``token_mask`` and both bounds, e.g. 0.5 and 5):
  :math:`w = \rho` inside :math:`[C_{min}, C_{max}]`, 0 outside (the token, or the whole
  sequence, drops out of the gradient; the loss's normalizer is unchanged).

The weight is a constant (no gradient) that multiplies the per-token policy loss. This is
TRL 1.16's ``vllm_importance_sampling_correction`` (on by default there, mode
``"sequence_mask"``, ``C_max = 3``), tested against TRL in ``tests/trl_parity``.

Metrics (means over the micro-batch's trained tokens; sequence modes take ratio stats over
sequences, as TRL):

* ``rollout_logp_gap`` / ``rollout_logp_gap_max``: :math:`|\ell^{prox} - \ell^{samp}|`;
* ``rollout_kl``: k3 estimate of KL(sampler || trainer), :math:`\rho - 1 - \log\rho` per token;
* ``rollout_is_mean`` / ``rollout_is_min`` / ``rollout_is_max``: the applied weight;
* ``rollout_masked_fraction`` (mask modes) or ``rollout_truncated_fraction`` (truncate modes):
  the share of trained tokens whose weight was zeroed or clipped.
"""

from __future__ import annotations

import math
from typing import Any

from twinkle.loss._tokens import per_sequence_sum

#: The modes, named as TRL's ``vllm_importance_sampling_mode``.
MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


class RolloutCorrection:
    """Truncated (TIS) or masked (MIS) importance weights between the trainer and the sampler.

    Args:
        mode: ``"token_truncate"``, ``"token_mask"``, ``"sequence_truncate"`` or ``"sequence_mask"``.
        clip_max: upper threshold :math:`C_{max}` (``None``: no upper bound).
        clip_min: lower threshold :math:`C_{min}` (``None``: no lower bound).

    Raises:
        ValueError: an unknown mode, a threshold <= 0, or ``clip_min > clip_max``.

    Example::

        correction = RolloutCorrection("token_mask", clip_min=0.5, clip_max=5.0)  # IcePop
        weight, metrics = correction(proximal_logps, sampler_logps, mask, index, num_sequences)
    """

    def __init__(self, mode: str = "sequence_mask", clip_max: float | None = 3.0, clip_min: float | None = None):
        if mode not in MODES:
            raise ValueError(f"rollout correction mode {mode!r} must be one of {MODES}")
        for name, value in (("clip_max", clip_max), ("clip_min", clip_min)):
            if value is not None and not value > 0:
                raise ValueError(f"rollout correction {name} must be > 0 or None, got {value}")
        if clip_min is not None and clip_max is not None and clip_min > clip_max:
            raise ValueError(f"rollout correction clip_min={clip_min} is above clip_max={clip_max}")
        self.mode = mode
        self.clip_max = clip_max
        self.clip_min = clip_min

    @property
    def sequence_level(self) -> bool:
        """True for the ``sequence_*`` modes."""
        return self.mode.startswith("sequence")

    def __call__(
        self, proximal: Any, sampler: Any, mask: Any, index: Any, num_sequences: int
    ) -> tuple[Any, dict[str, float]]:
        """The ``[B, T]`` weight (detached, 0 off the mask) and its metrics.

        Args:
            proximal: ``[B, T]`` trainer log-probabilities of the sampling policy.
            sampler: ``[B, T]`` the sampler's log-probabilities of the same tokens.
            mask: ``[B, T]`` bool, trained positions.
            index: ``[B, T]`` sequence index of each position (see ``sequence_index``).
            num_sequences: number of sequences.
        """
        import torch

        mask = mask.bool()
        diff = torch.nan_to_num((proximal.detach().float() - sampler.float()) * mask, nan=0.0)
        if self.sequence_level:
            seq_ratio = torch.exp(per_sequence_sum(diff, mask, index, num_sequences))
            ratio = seq_ratio[index.clamp(min=0)]
        else:
            ratio = torch.exp(diff)
        lo = -math.inf if self.clip_min is None else self.clip_min
        hi = math.inf if self.clip_max is None else self.clip_max
        outside = (ratio < lo) | (ratio > hi)
        if self.mode.endswith("truncate"):
            weight = self._truncate(ratio)
        else:
            weight = ratio.masked_fill(outside, 0.0)
        weight = torch.where(mask, weight, torch.zeros_like(weight))

        n_tok = max(int(mask.sum()), 1)
        gap = diff.abs()[mask]
        token_ratio = torch.exp(diff)
        metrics = {
            "rollout_logp_gap": float(gap.sum()) / n_tok,
            "rollout_logp_gap_max": float(gap.max()) if gap.numel() else 0.0,
            "rollout_kl": float(((token_ratio - 1 - diff) * mask).sum()) / n_tok,
        }
        if self.sequence_level:
            if self.mode.endswith("truncate"):
                flat = self._truncate(seq_ratio)
            else:
                flat = seq_ratio.masked_fill((seq_ratio < lo) | (seq_ratio > hi), 0.0)
        else:
            flat = weight[mask]
        if flat.numel():
            metrics.update(
                rollout_is_mean=float(flat.mean()), rollout_is_min=float(flat.min()), rollout_is_max=float(flat.max())
            )
        share = float((outside & mask).sum()) / n_tok
        metrics["rollout_truncated_fraction" if self.mode.endswith("truncate") else "rollout_masked_fraction"] = share
        return weight.detach(), metrics

    def _truncate(self, ratio: Any) -> Any:
        if self.clip_min is None and self.clip_max is None:
            return ratio
        return ratio.clamp(min=self.clip_min, max=self.clip_max)
