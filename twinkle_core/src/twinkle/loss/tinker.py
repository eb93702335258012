"""Tinker's loss functions (``cross_entropy``, ``importance_sampling``, ``ppo``, ``cispo``, ``dro``,
``gspo``, ``stable_reinforce``) in core.

One implementation per formula: the service's Tinker API (``twinkle_server.losses``) and the
:class:`TinkerLoss` component (``model.set_loss("TinkerLoss", loss_fn="ppo")``) both call the
functions here. Each takes the trained policy's log-probability of every target token
(``logp``, shape ``(N,)``, differentiable), the per-token inputs as float tensors and the
checked config, and returns the summed loss (Tinker's losses are sums over tokens: normalise
with ``weights`` or ``advantages``) and the per-token outputs to send back.

* ``cross_entropy``: ``-(weights * logp).sum()``; inputs ``target_tokens``, optional ``weights``.
* ``importance_sampling``: ``-(exp(logp - q) * A).sum()``; inputs ``logprobs`` (q), ``advantages`` (A).
* ``ppo``: ``-min(r * A, clip(r, lo, hi) * A).sum()`` with ``r = exp(logp - q)``; config
  ``clip_low_threshold`` (0.8) and ``clip_high_threshold`` (1.2).
* ``cispo``: ``-(stopgrad(clip(r, lo, hi)) * logp * A).sum()``; same config as ppo.
* ``dro``: ``-(logp * A - beta / 2 * (logp - q) ** 2).sum()``; config ``beta`` (required).
* ``gspo`` (GSPO-token, as Tinker documents it): one sequence log-ratio
  ``l = mean((stopgrad(logp) - q)[M])`` over the tokens ``M`` that the optional
  ``sequence_ratio_mask`` marks (all tokens without one); every token's ratio is
  ``s_t = exp(l + logp - stopgrad(logp))`` (the sequence ratio's value, its own gradient) and the loss
  is ppo's on ``s_t``: ``-min(s_t * A, clip(s_t, lo, hi) * A).sum()``. One call is one sequence.
* ``stable_reinforce``: REINFORCE against the sampling policy ``q`` that the sampler recorded
  (``record_stability_info=True``; the service fills ``logprobs`` from the sampled sequences the datum's
  provenance names). Tinker does not publish its formula; this is ours, documented and tested:
  ``r = exp(logp - q)``, ``-(stopgrad(min(r, clip_high_threshold)) * A * logp).sum()
  + kl_coeff * (r - 1 - (logp - q)).sum()`` (a truncated importance weight, not differentiated, so a
  stale or numerically different sampler cannot blow the step up; the k3 estimate of KL(q || p) as an
  optional anchor), on the tokens of the optional ``stability_mask`` (tokens that were sampled).
  Config ``clip_high_threshold`` (2.0), ``kl_coeff`` (0.0).

(:mod:`twinkle.loss.rl` holds the GRPO family, whose PPO/CISPO normalise per token or sequence
and clip around 1 with ``epsilon``: other formulas, other components.)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from twinkle.loss.base import Loss, LossOutput, token_logps

LOSS_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
    "gspo": ("target_tokens", "logprobs", "advantages"),
    "stable_reinforce": ("target_tokens", "logprobs", "advantages"),
}
OPTIONAL_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("weights",),
    "gspo": ("sequence_ratio_mask",),
    "stable_reinforce": ("stability_mask",),
}
# losses whose value couples a sequence's tokens: called once per sequence (a server registers its
# tenants' custom losses here too: Tinker calls those per datum)
PER_SEQUENCE: set[str] = {"gspo"}
LOSS_CONFIG: dict[str, dict[str, float | None]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "dro": {"beta": None},
    "gspo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "stable_reinforce": {"clip_high_threshold": 2.0, "kl_coeff": 0.0},
}


class LossConfigError(ValueError):
    """A loss name, input or config key that Tinker's losses do not support."""


def check_loss(loss_fn: str, config: Mapping[str, Any] | None) -> dict[str, float]:
    """Validate ``loss_fn`` and its config; returns the config with defaults filled in.

    Raises:
        LossConfigError: unknown loss, unknown config key, non-numeric or non-finite value or
            missing required key.
    """
    if loss_fn not in LOSS_CONFIG:
        raise LossConfigError(
            f"loss_fn={loss_fn!r} is not supported by this server; supported: "
            f"{', '.join(k for k in LOSS_CONFIG if ':' not in k)}"
        )
    allowed = LOSS_CONFIG[loss_fn]
    resolved: dict[str, float] = {}
    for key, value in (config or {}).items():
        if key not in allowed:
            hint = f"it accepts {', '.join(allowed)}" if allowed else "it takes no loss_fn_config"
            raise LossConfigError(f"loss_fn_config key {key!r} is not supported for {loss_fn!r}; {hint}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LossConfigError(f"loss_fn_config[{key!r}] must be a number, got {value!r}")
        if not math.isfinite(value):  # a NaN clip threshold makes every step NaN
            raise LossConfigError(f"loss_fn_config[{key!r}]={value!r} is not a finite number")
        resolved[key] = float(value)
    for key, default in allowed.items():
        if key not in resolved:
            if default is None:
                raise LossConfigError(f"loss_fn={loss_fn!r} needs loss_fn_config[{key!r}] (a number)")
            resolved[key] = default
    if "clip_low_threshold" in resolved and resolved["clip_low_threshold"] > resolved["clip_high_threshold"]:
        raise LossConfigError("clip_low_threshold must not exceed clip_high_threshold")
    if loss_fn == "stable_reinforce" and (resolved["clip_high_threshold"] <= 0 or resolved["kl_coeff"] < 0):
        raise LossConfigError("stable_reinforce needs clip_high_threshold > 0 and kl_coeff >= 0")
    return resolved


def _ratio(logp: Any, inputs: Mapping[str, Any]) -> Any:
    import torch

    return torch.exp(logp - inputs["logprobs"])


def cross_entropy(logp: Any, inputs: Mapping[str, Any], config: Mapping[str, float]) -> tuple[Any, dict[str, Any]]:
    """Weighted negative log-likelihood, summed."""
    import torch

    weights = inputs.get("weights")
    if weights is None:
        weights = torch.ones_like(logp)
    elementwise = -(weights * logp)
    return elementwise.sum(), {"logprobs": logp, "elementwise_loss": elementwise}


def importance_sampling(
    logp: Any, inputs: Mapping[str, Any], config: Mapping[str, float]
) -> tuple[Any, dict[str, Any]]:
    """REINFORCE with an importance weight against the sampling policy."""
    return -(_ratio(logp, inputs) * inputs["advantages"]).sum(), {"logprobs": logp}


def ppo(logp: Any, inputs: Mapping[str, Any], config: Mapping[str, float]) -> tuple[Any, dict[str, Any]]:
    """Token-level clipped PPO objective."""
    import torch

    ratio = _ratio(logp, inputs)
    adv = inputs["advantages"]
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    return -torch.min(ratio * adv, clipped * adv).sum(), {"logprobs": logp}


def cispo(logp: Any, inputs: Mapping[str, Any], config: Mapping[str, float]) -> tuple[Any, dict[str, Any]]:
    """Clipped importance-sampling policy optimisation (the clipped weight is not differentiated)."""
    import torch

    weight = torch.clamp(_ratio(logp, inputs), config["clip_low_threshold"], config["clip_high_threshold"]).detach()
    return -(weight * logp * inputs["advantages"]).sum(), {"logprobs": logp}


def dro(logp: Any, inputs: Mapping[str, Any], config: Mapping[str, float]) -> tuple[Any, dict[str, Any]]:
    """Direct reward optimisation with a quadratic penalty on the log-ratio."""
    quadratic = (logp - inputs["logprobs"]) ** 2
    objective = logp * inputs["advantages"] - 0.5 * config["beta"] * quadratic
    return -objective.sum(), {"logprobs": logp}


def gspo(logp: Any, inputs: Mapping[str, Any], config: Mapping[str, float]) -> tuple[Any, dict[str, Any]]:
    """GSPO-token on one sequence: the sequence ratio's value, each token's own gradient, clipped as ppo."""
    import torch

    log_ratio = logp.detach() - inputs["logprobs"]
    mask = inputs.get("sequence_ratio_mask")
    in_ratio = torch.ones_like(log_ratio, dtype=torch.bool) if mask is None else mask != 0
    if bool(in_ratio.any()):
        seq_log_ratio = log_ratio[in_ratio].mean()
    else:
        seq_log_ratio = log_ratio.new_zeros(())
    ratio = torch.exp(seq_log_ratio + logp - logp.detach())
    adv = inputs["advantages"]
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    return -torch.min(ratio * adv, clipped * adv).sum(), {"logprobs": logp}


def stable_reinforce(
    logp: Any, inputs: Mapping[str, Any], config: Mapping[str, float]
) -> tuple[Any, dict[str, Any]]:
    """REINFORCE with a truncated, non-differentiated importance weight and an optional k3 KL anchor."""
    import torch

    log_ratio = logp - inputs["logprobs"]
    ratio = torch.exp(log_ratio)
    weight = torch.clamp(ratio, max=config["clip_high_threshold"]).detach()
    per_token = -(weight * inputs["advantages"] * logp)
    if config["kl_coeff"]:
        per_token = per_token + config["kl_coeff"] * (ratio - 1 - log_ratio)
    mask = inputs.get("stability_mask")
    if mask is not None:
        per_token = per_token * (mask != 0).to(per_token.dtype)
    return per_token.sum(), {"logprobs": logp}


LOSSES: dict[str, Callable[..., tuple[Any, dict[str, Any]]]] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "gspo": gspo,
    "stable_reinforce": stable_reinforce,
}


class TinkerLoss(Loss):
    """One of Tinker's losses as a core component, on the trained (``shift_labels``) tokens of a batch.

    Per-token inputs come from the rows given to ``forward_backward`` (the processor shifts
    per-token lists like the labels): ``logprobs`` (the sampling policy's), ``advantages``
    (a number per row, or per token) and, for ``cross_entropy``, optional ``weights``.

    Args:
        loss_fn: ``cross_entropy``, ``importance_sampling``, ``ppo``, ``cispo``, ``dro``, ``gspo`` or
            ``stable_reinforce`` (here ``logprobs`` are the sampler's, given per row).
        normalize: ``True`` (default): the model divides the summed loss by the window's trained
            tokens, as every core loss; ``False``: the loss stays a sum, as Tinker's (the
            normalizer is 1 per micro-batch).
        **config: the ``loss_fn_config`` (``clip_low_threshold``, ``clip_high_threshold``, ``beta``,
            ``kl_coeff``).

    Raises:
        LossConfigError: an unknown loss or config key, a missing required key.

    Example::

        model.set_loss("TinkerLoss", loss_fn="ppo", clip_low_threshold=0.8, clip_high_threshold=1.2)
        model.forward_backward(rows, logprobs=[...], advantages=[...])
    """

    def __init__(self, loss_fn: str = "cross_entropy", normalize: bool = True, **config: Any) -> None:
        self.loss_fn = loss_fn
        self.config = check_loss(loss_fn, config)
        self.normalize = bool(normalize)
        #: keep the last call's ``(token logps [B, T] detached, trained-token mask, row_ids)`` in
        #: :attr:`last_token_logps` (the service sends every datum's logprobs back).
        self.keep_token_logps = False
        self.last_token_logps: tuple[Any, Any, Any] | None = None

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> LossOutput:
        """The summed loss over the trained tokens; normalizer: their count (or 1, ``normalize=False``)."""
        import torch

        mask = inputs["shift_labels"] != -100
        all_logp = token_logps(inputs, outputs)
        # which sequence each position belongs to: a packed batch holds several in one row
        row_ids = inputs.get("row_ids")
        owners = row_ids if row_ids is not None else torch.arange(mask.shape[0], device=mask.device)[:, None]
        owners = owners.expand_as(mask)
        if self.keep_token_logps:
            self.last_token_logps = (all_logp.detach(), mask, owners)
        logp = all_logp[mask]
        fields = {}
        for key in LOSS_INPUTS[self.loss_fn][1:] + OPTIONAL_INPUTS.get(self.loss_fn, ()):
            value = inputs.get(key)
            if value is None:
                if key in OPTIONAL_INPUTS.get(self.loss_fn, ()):
                    continue
                raise ValueError(
                    f"TinkerLoss({self.loss_fn!r}) needs the per-row field {key!r} in the inputs of forward_backward"
                )
            fields[key] = value
        if self.loss_fn in PER_SEQUENCE:  # one call per sequence: the loss couples a sequence's tokens
            loss = all_logp.new_zeros(())
            for r in range(int(owners.max()) + 1):
                selected = mask & (owners == r)
                if bool(selected.any()):
                    seq_inputs = {k: v[selected].to(all_logp.dtype) for k, v in fields.items()}
                    loss = loss + LOSSES[self.loss_fn](all_logp[selected], seq_inputs, self.config)[0]
        else:
            per_token = {k: v[mask].to(logp.dtype) for k, v in fields.items()}
            loss, _ = LOSSES[self.loss_fn](logp, per_token, self.config)
        tokens = inputs.get("num_label_tokens")
        if tokens is None:
            tokens = int(mask.sum())
        return LossOutput(loss=loss, num_tokens=tokens if self.normalize else 1)
