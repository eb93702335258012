"""The Tinker loss functions, on per-token log-probabilities.

Every loss takes ``target_logprobs`` (the trained policy's log-probability of each target
token, shape ``(N,)``, differentiable), the datum's ``loss_fn_inputs`` as float tensors and
the request's ``loss_fn_config``, and returns the datum's summed loss (a scalar) and the
per-token outputs to send back. Losses are sums over tokens, as in Tinker: normalise
with ``weights`` or ``advantages`` on the client side.

* ``cross_entropy``: ``-(weights * logp).sum()``; inputs ``target_tokens``, optional ``weights``.
* ``importance_sampling``: ``-(exp(logp - q) * A).sum()``; inputs ``logprobs`` (q), ``advantages`` (A).
* ``ppo``: ``-min(r * A, clip(r, lo, hi) * A).sum()`` with ``r = exp(logp - q)``; config
  ``clip_low_threshold`` (0.8) and ``clip_high_threshold`` (1.2).
* ``cispo``: ``-(stopgrad(clip(r, lo, hi)) * logp * A).sum()``; same config as ppo.
* ``dro``: ``-(logp * A - beta / 2 * (logp - q) ** 2).sum()``; config ``beta`` (required).
"""

from __future__ import annotations

from typing import Any, Callable

LOSS_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
}
OPTIONAL_INPUTS: dict[str, tuple[str, ...]] = {"cross_entropy": ("weights",)}
LOSS_CONFIG: dict[str, dict[str, float | None]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "dro": {"beta": None},
}


class LossConfigError(ValueError):
    """A loss name, input or config key the server does not support."""


def check_loss(loss_fn: str, config: dict[str, Any] | None) -> dict[str, float]:
    """Validate ``loss_fn`` and its config; returns the config with defaults filled in.

    Raises:
        LossConfigError: unknown loss, unknown config key, non-numeric value or missing required key.
    """
    if loss_fn not in LOSS_CONFIG:
        raise LossConfigError(
            f"loss_fn={loss_fn!r} is not supported by this server; supported: {', '.join(LOSS_CONFIG)}"
        )
    allowed = LOSS_CONFIG[loss_fn]
    resolved: dict[str, float] = {}
    for key, value in (config or {}).items():
        if key not in allowed:
            hint = f"it accepts {', '.join(allowed)}" if allowed else "it takes no loss_fn_config"
            raise LossConfigError(f"loss_fn_config key {key!r} is not supported for {loss_fn!r}; {hint}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LossConfigError(f"loss_fn_config[{key!r}] must be a number, got {value!r}")
        resolved[key] = float(value)
    for key, default in allowed.items():
        if key not in resolved:
            if default is None:
                raise LossConfigError(f"loss_fn={loss_fn!r} needs loss_fn_config[{key!r}] (a number)")
            resolved[key] = default
    if "clip_low_threshold" in resolved and resolved["clip_low_threshold"] > resolved["clip_high_threshold"]:
        raise LossConfigError("clip_low_threshold must not exceed clip_high_threshold")
    return resolved


def _ratio(logp: Any, inputs: dict[str, Any]) -> Any:
    import torch

    return torch.exp(logp - inputs["logprobs"])


def cross_entropy(logp: Any, inputs: dict[str, Any], config: dict[str, float]) -> tuple[Any, dict[str, Any]]:
    """Weighted negative log-likelihood, summed."""
    import torch

    weights = inputs.get("weights")
    if weights is None:
        weights = torch.ones_like(logp)
    elementwise = -(weights * logp)
    return elementwise.sum(), {"logprobs": logp, "elementwise_loss": elementwise}


def importance_sampling(logp: Any, inputs: dict[str, Any], config: dict[str, float]) -> tuple[Any, dict[str, Any]]:
    """REINFORCE with an importance weight against the sampling policy."""
    return -(_ratio(logp, inputs) * inputs["advantages"]).sum(), {"logprobs": logp}


def ppo(logp: Any, inputs: dict[str, Any], config: dict[str, float]) -> tuple[Any, dict[str, Any]]:
    """Token-level clipped PPO objective."""
    import torch

    ratio = _ratio(logp, inputs)
    adv = inputs["advantages"]
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    return -torch.min(ratio * adv, clipped * adv).sum(), {"logprobs": logp}


def cispo(logp: Any, inputs: dict[str, Any], config: dict[str, float]) -> tuple[Any, dict[str, Any]]:
    """Clipped importance-sampling policy optimisation (the clipped weight is not differentiated)."""
    import torch

    weight = torch.clamp(_ratio(logp, inputs), config["clip_low_threshold"], config["clip_high_threshold"]).detach()
    return -(weight * logp * inputs["advantages"]).sum(), {"logprobs": logp}


def dro(logp: Any, inputs: dict[str, Any], config: dict[str, float]) -> tuple[Any, dict[str, Any]]:
    """Direct reward optimisation with a quadratic penalty on the log-ratio."""
    quadratic = (logp - inputs["logprobs"]) ** 2
    objective = logp * inputs["advantages"] - 0.5 * config["beta"] * quadratic
    return -objective.sum(), {"logprobs": logp}


LOSSES: dict[str, Callable[..., tuple[Any, dict[str, Any]]]] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
}
