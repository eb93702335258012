r"""Preference losses: DPO (sigmoid, IPO, hinge), SimPO, ORPO.

Batch layout: rows come in **pairs, interleaved**: row ``2k`` is the chosen completion of
pair ``k``, row ``2k + 1`` its rejected completion (labels on the completion only). The
interleaving keeps a pair on one data-parallel rank when a batch is split. DPO also needs
``ref_logps`` per row (per token, aligned with labels): the reference policy's
log-probabilities, from ``model.forward_only`` with the adapter disabled (no second copy
of the model).

With :math:`\log\pi(y)` the summed log-probability of a completion's tokens,
:math:`|y|` its length, :math:`\Delta = [\log\pi(y_w) - \log\pi_{ref}(y_w)] - [\log\pi(y_l) - \log\pi_{ref}(y_l)]`:

* DPO sigmoid: ``L = -(1 - s) log sigmoid(beta * D) - s log sigmoid(-beta * D)`` (``s`` = label smoothing)
* IPO: ``L = (D / |y| - 1 / (2 beta))^2`` with both log-ratios divided by their lengths (as TRL)
* hinge: ``L = max(0, 1 - beta * D)``
* SimPO (reference-free): ``L = -log sigmoid(beta * (log pi(y_w)/|y_w| - log pi(y_l)/|y_l|) - gamma)``
* ORPO (reference-free): ``L = NLL(y_w)/|y_w| - lambda * log sigmoid(log odds(y_w) - log odds(y_l))``
  with ``log odds(y) = m - log(1 - exp(m))`` and ``m = log pi(y)/|y|``

Each loss returns the sum over pairs with ``num_tokens`` = the number of pairs, so the model
backend averages over the pairs of the whole gradient-accumulation window. Metrics:
``reward_margin`` (mean ``beta * D`` for DPO), ``reward_accuracy`` (share with ``D > 0``).
"""

from __future__ import annotations

from typing import Any, Mapping

from twinkle.loss._tokens import label_mask, per_sequence_count, per_sequence_sum, require, sequence_index
from twinkle.loss.base import Loss, LossOutput, token_logps


def sequence_logps(inputs: Mapping[str, Any], outputs: Mapping[str, Any], who: str) -> tuple[Any, Any, Any, Any]:
    """(policy seq logps ``[S]``, completion lengths ``[S]``, position->sequence index, mask); checks pairing."""
    logps = token_logps(inputs, outputs)
    mask = label_mask(inputs)
    index, num_seqs = sequence_index(inputs, mask)
    if num_seqs == 0 or num_seqs % 2:
        raise ValueError(
            f"{who}: got {num_seqs} rows; preference losses need pairs interleaved as "
            "[chosen_0, rejected_0, chosen_1, rejected_1, ...] (an even number of rows per micro-batch)"
        )
    counts = per_sequence_count(mask, index, num_seqs)
    if bool((counts == 0).any()):
        raise ValueError(f"{who}: a row has no trained tokens; put labels on each chosen/rejected completion")
    return per_sequence_sum(logps, mask, index, num_seqs), counts, index, mask


class DPOLoss(Loss):
    """Direct Preference Optimization (sigmoid / IPO / hinge); formulas in the module docstring.

    Args:
        beta: the KL strength.
        loss_type: ``"sigmoid"`` (DPO), ``"ipo"`` or ``"hinge"``.
        label_smoothing: conservative DPO's ``s`` (sigmoid only), in ``[0, 0.5)``.

    Raises:
        ValueError: bad options, an odd number of rows, or no ``ref_logps``.

    Example::

        model.set_loss("DPOLoss", beta=0.1)
        with model.disable_adapter():   # reference = the base model
            ref = model.forward_only(inputs=pairs)["logps"]
        model.forward_backward(inputs=[dict(r, ref_logps=lp) for r, lp in zip(pairs, ref)])
    """

    LOSS_TYPES = ("sigmoid", "ipo", "hinge")

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> None:
        if loss_type not in self.LOSS_TYPES:
            raise ValueError(f"DPOLoss: loss_type={loss_type!r} must be one of {self.LOSS_TYPES}")
        if beta <= 0:
            raise ValueError(f"DPOLoss: beta must be > 0, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"DPOLoss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> LossOutput:
        """Sum over pairs of the DPO loss; normalizer: the number of pairs."""
        import torch.nn.functional as F

        seq, counts, index, mask = sequence_logps(inputs, outputs, "DPOLoss")
        ref_tokens = require(
            inputs,
            "ref_logps",
            "DPOLoss",
            "run model.forward_only(inputs=rows) with the adapter disabled and add its 'logps' to each row",
        ).to(seq)
        ref = per_sequence_sum(ref_tokens, mask, index, seq.shape[0])
        ratios = seq - ref
        chosen, rejected = ratios[0::2], ratios[1::2]
        delta = chosen - rejected
        if self.loss_type == "sigmoid":
            s = self.label_smoothing
            losses = -(1 - s) * F.logsigmoid(self.beta * delta) - s * F.logsigmoid(-self.beta * delta)
        elif self.loss_type == "ipo":
            ipo_delta = chosen / counts[0::2] - rejected / counts[1::2]
            losses = (ipo_delta - 1 / (2 * self.beta)) ** 2
        else:
            losses = (1 - self.beta * delta).clamp(min=0)
        n = losses.shape[0]
        extra = {
            "reward_margin": float(self.beta * delta.detach().mean()),
            "reward_accuracy": float((delta.detach() > 0).float().mean()),
            "chosen_reward": float(self.beta * chosen.detach().mean()),
            "rejected_reward": float(self.beta * rejected.detach().mean()),
        }
        return LossOutput(loss=losses.sum(), num_tokens=n, extra=extra)


class SimPOLoss(Loss):
    """SimPO: reference-free, length-normalized margin loss (module docstring).

    Args:
        beta: scale of the average log-probabilities (2.0 in the paper).
        gamma: target reward margin (``gamma`` itself, not ``gamma / beta``).
    """

    def __init__(self, beta: float = 2.0, gamma: float = 0.5) -> None:
        if beta <= 0:
            raise ValueError(f"SimPOLoss: beta must be > 0, got {beta}")
        self.beta, self.gamma = beta, gamma

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> LossOutput:
        """Sum over pairs; normalizer: the number of pairs."""
        import torch.nn.functional as F

        seq, counts, _, _ = sequence_logps(inputs, outputs, "SimPOLoss")
        avg = seq / counts
        margin = self.beta * (avg[0::2] - avg[1::2])
        losses = -F.logsigmoid(margin - self.gamma)
        extra = {
            "reward_margin": float(margin.detach().mean()),
            "reward_accuracy": float((margin.detach() > 0).float().mean()),
        }
        return LossOutput(loss=losses.sum(), num_tokens=losses.shape[0], extra=extra)


class ORPOLoss(Loss):
    """ORPO: NLL on the chosen completion plus a weighted odds-ratio penalty (module docstring).

    Args:
        lam: the weight ``lambda`` of the odds-ratio term (0.1 in the paper).
    """

    def __init__(self, lam: float = 0.1) -> None:
        if lam < 0:
            raise ValueError(f"ORPOLoss: lam must be >= 0, got {lam}")
        self.lam = lam

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> LossOutput:
        """Sum over pairs; normalizer: the number of pairs."""
        import torch
        import torch.nn.functional as F

        seq, counts, _, _ = sequence_logps(inputs, outputs, "ORPOLoss")
        avg = seq / counts
        # log(1 - exp(m)) for m < 0, computed stably
        log_one_minus = torch.log(-torch.expm1(avg.clamp(max=-1e-6)))
        log_odds = (avg[0::2] - avg[1::2]) - (log_one_minus[0::2] - log_one_minus[1::2])
        ratio_term = F.logsigmoid(log_odds)
        nll = -avg[0::2]
        losses = nll - self.lam * ratio_term
        extra = {
            "nll": float(nll.detach().mean()),
            "log_odds_ratio": float(log_odds.detach().mean()),
            "reward_accuracy": float((log_odds.detach() > 0).float().mean()),
        }
        return LossOutput(loss=losses.sum(), num_tokens=losses.shape[0], extra=extra)
