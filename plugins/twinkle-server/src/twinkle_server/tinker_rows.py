"""Tinker requests as core rows: the request types, the checks, and per-datum outputs.

A Tinker datum's ``target_tokens`` are unshifted (``target_tokens[i]`` follows
``model_input[i]``); core's rows carry ``labels`` that its processor shifts by one. A datum of
``n`` tokens therefore becomes the row ``input_ids = model_input + [last target]``,
``labels = [-100] + target_tokens`` (``n + 1`` tokens): the shifted labels are exactly the
targets, and the appended token is never trained (causal attention: it only sees earlier
tokens). Per-token loss inputs (``weights``, ``logprobs``, ``advantages``, masks) get a
leading 0 the same way.

Example::

    rows, lengths = job_rows(BatchJob(0, [Datum([1, 2], {"target_tokens": [2, 3]})]), vocab_size=100, max_length=64)
    rows[0]["input_ids"].tolist(), rows[0]["labels"].tolist()  # [1, 2, 3], [-100, 2, 3]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from twinkle_server.losses import LOSS_INPUTS, OPTIONAL_INPUTS, check_loss

#: a loss input the datum may leave out, and the value that means "as if absent".
OPTIONAL_DEFAULTS = {"weights": 1.0, "sequence_ratio_mask": 1.0, "stability_mask": 1.0}


class EngineError(ValueError):
    """A request the engine cannot serve, with the reason and the fix (shown to the user)."""


@dataclass
class Datum:
    """One training sequence: input tokens and per-token loss inputs (numpy arrays or lists)."""

    tokens: Sequence[int]
    inputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchJob:
    """One request's part of a batched pass: the slot, its datums and its loss."""

    slot: int
    datums: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_config: dict[str, Any] | None = None
    forward_only: bool = False


@dataclass
class JobResult:
    """Per-datum outputs (name -> float32 numpy array) and metrics of one job, or its error."""

    outputs: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    error: Exception | None = None


def check_adam_params(hyper: dict[str, float]) -> tuple[float, float, float, float, float, float]:
    """``(lr, beta1, beta2, eps, weight_decay, grad_clip_norm)`` from Tinker's AdamParams fields, checked.

    Raises:
        EngineError: an unknown field or a value out of range.
    """
    defaults = {
        "learning_rate": 1e-4,
        "beta1": 0.9,
        "beta2": 0.95,
        "eps": 1e-12,
        "weight_decay": 0.0,
        "grad_clip_norm": 0.0,
    }
    unknown = sorted(set(hyper) - set(defaults))
    if unknown:
        raise EngineError(f"unknown AdamParams {unknown}; this server takes {sorted(defaults)}")
    values = {k: float(hyper.get(k, v)) for k, v in defaults.items()}
    checks = {
        "learning_rate": values["learning_rate"] >= 0,
        "beta1": 0 <= values["beta1"] < 1,
        "beta2": 0 <= values["beta2"] < 1,
        "eps": values["eps"] >= 0,
        "weight_decay": values["weight_decay"] >= 0,
        "grad_clip_norm": values["grad_clip_norm"] >= 0,
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise EngineError(f"AdamParams out of range: {', '.join(bad)}")
    return tuple(values.values())  # type: ignore[return-value]


def job_rows(job: BatchJob, *, vocab_size: int, max_length: int) -> tuple[list[dict[str, Any]], list[int]]:
    """Check a job's datums; returns them as core rows (see the module docstring) and their token counts.

    Every row carries each input of the job's loss, the optional ones filled with their neutral
    value (a packed pass fills a field that a row lacks with zeros, which is not "absent").

    Raises:
        EngineError: the loss, its config or a datum is invalid (the message names the datum and the fix).
    """
    import numpy as np

    check_loss(job.loss_fn, job.loss_config)
    if not job.datums:
        raise EngineError("a forward_backward request needs at least one datum")
    required = LOSS_INPUTS[job.loss_fn]
    optional = OPTIONAL_INPUTS.get(job.loss_fn, ())
    allowed = set(required) | set(optional)
    rows, lengths = [], []
    for i, datum in enumerate(job.datums):
        tokens = np.asarray(datum.tokens, dtype=np.int64).reshape(-1)
        n = tokens.shape[0]
        if n == 0:
            raise EngineError(f"datum {i} has an empty model_input")
        if n > max_length:
            raise EngineError(f"datum {i} has {n} tokens; the base model takes at most {max_length}")
        if tokens.min() < 0 or tokens.max() >= vocab_size:
            raise EngineError(f"datum {i} has token ids outside the vocabulary [0, {vocab_size})")
        missing = [k for k in required if k not in datum.inputs]
        if missing:
            raise EngineError(f"datum {i}: loss {job.loss_fn!r} needs loss_fn_inputs {missing}")
        extra = sorted(set(datum.inputs) - allowed)
        if extra:
            raise EngineError(
                f"datum {i}: loss_fn_inputs {extra} are not used by {job.loss_fn!r} (it takes {sorted(allowed)})"
            )
        row: dict[str, Any] = {}
        for key, value in datum.inputs.items():
            arr = np.asarray(value).reshape(-1)
            if arr.shape[0] != n:
                raise EngineError(
                    f"datum {i}: loss_fn_inputs[{key!r}] has {arr.shape[0]} entries but model_input has {n} tokens"
                )
            if key == "target_tokens":
                targets = arr.astype(np.int64)
                if targets.min() < 0 or targets.max() >= vocab_size:
                    raise EngineError(f"datum {i}: target_tokens outside the vocabulary [0, {vocab_size})")
                row["input_ids"] = np.concatenate([tokens, targets[-1:]])
                row["labels"] = np.concatenate([[-100], targets])
            else:
                floats = arr.astype(np.float32)
                if not np.isfinite(floats).all():
                    raise EngineError(f"datum {i}: loss_fn_inputs[{key!r}] holds NaN or infinity")
                row[key] = np.concatenate([np.zeros(1, np.float32), floats])
        for key in optional:
            if key not in row:
                row[key] = np.full(n + 1, OPTIONAL_DEFAULTS[key], dtype=np.float32)
                row[key][0] = 0.0
        rows.append(row)
        lengths.append(n)
    return rows, lengths


def datum_outputs(loss_fn: str, rows: list[dict[str, Any]], logprobs: list[Any]) -> list[dict[str, Any]]:
    """Per datum what Tinker sends back: ``logprobs`` (float32, one per target) and, for
    ``cross_entropy``, ``elementwise_loss = -(weights * logprobs)``."""
    import numpy as np

    outputs = []
    for row, values in zip(rows, logprobs, strict=True):
        out = {"logprobs": np.asarray(values, dtype=np.float32)}
        if loss_fn == "cross_entropy":
            out["elementwise_loss"] = -(row["weights"][1:] * out["logprobs"])
        outputs.append(out)
    return outputs
