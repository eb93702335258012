"""Logprob consistency: the sampler's log-probabilities of its own samples vs the trainer's.

RL losses compare the trainer's log-probabilities with ``old_logps`` recorded by the sampler.
When the two engines disagree on the same weights (different kernels, dtypes, fused layers),
the importance ratio is biased before any learning happens. Measure it:

* :func:`logprob_diff` compares sampled sequences with the trainer's recomputed log-probs
  (``model.forward_only(...)["logps"]``) and returns max / mean absolute difference.
* :class:`LogprobConsistency` is the same measurement as a registered Metric: add it to a
  model (``model.add_metric("LogprobConsistency", is_training=False)``), run ``forward_only``
  on rows carrying ``old_logps`` (every ``SampledSequence.input_feature`` does), then read
  ``model.calculate_metric(is_training=False)``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from twinkle.metric.base import Metric


def logprob_diff(sequences: Sequence[Any], trainer_logps: Sequence[Sequence[float]]) -> dict[str, float]:
    """Max and mean absolute difference between sampler and trainer log-probs of the sampled tokens.

    Args:
        sequences: SampledSequences (or their ``input_feature`` dicts) carrying ``old_logps``.
        trainer_logps: per row, log-probs aligned with the row's labels (``forward_only``'s ``logps``).

    Returns:
        ``logprob_abs_diff_max``, ``logprob_abs_diff_mean`` (nats per token) and ``logprob_tokens``.

    Raises:
        ValueError: a row without ``old_logps`` (sample with ``logprobs=True``) or rows of different lengths.

    Example::

        rows = [seq.input_feature for seq in sequences]
        logprob_diff(sequences, model.forward_only(inputs=rows)["logps"])
    """
    if len(sequences) != len(trainer_logps):
        raise ValueError(f"{len(sequences)} sequences but {len(trainer_logps)} rows of trainer log-probs")
    worst, total, count = 0.0, 0.0, 0
    for i, (seq, theirs) in enumerate(zip(sequences, trainer_logps)):
        row = seq if isinstance(seq, Mapping) else seq.input_feature
        ours = row.get("old_logps")
        if ours is None:
            raise ValueError(f"row {i} has no old_logps; sample with SamplingParams(logprobs=True)")
        theirs = [float(x) for x in (theirs.tolist() if hasattr(theirs, "tolist") else theirs)]
        if len(theirs) != len(ours):
            raise ValueError(f"row {i}: {len(ours)} sampler log-probs vs {len(theirs)} trainer log-probs")
        for label, a, b in zip(row["labels"], ours, theirs):
            if label == -100:
                continue
            diff = abs(float(a) - b)
            worst = max(worst, diff)
            total += diff
            count += 1
    return {
        "logprob_abs_diff_max": worst,
        "logprob_abs_diff_mean": total / count if count else 0.0,
        "logprob_tokens": float(count),
    }


class LogprobConsistency(Metric):
    """Metric: |sampler ``old_logps`` - trainer log-probs| over the labelled tokens of each batch.

    Reports ``logprob_abs_diff_max`` and ``logprob_abs_diff_mean`` (nats per token). Batches
    without ``old_logps`` are skipped.

    Example::

        model.add_metric("LogprobConsistency", is_training=False)
        model.forward_only(inputs=[seq.input_feature for seq in sequences])
        model.calculate_metric(is_training=False)["logprob_abs_diff_max"]
    """

    def __init__(self) -> None:
        self.reset()

    def update(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Accumulate one micro-batch (``inputs['old_logps']`` vs ``token_logps(inputs, outputs)``)."""
        old = inputs.get("old_logps")
        if old is None:
            return
        from twinkle.loss.base import token_logps

        mask = inputs["shift_labels"] != -100
        diff = (old.float() - token_logps(inputs, outputs).float()).abs()[mask]
        if diff.numel():
            self.worst = max(self.worst, float(diff.max()))
            self.total += float(diff.sum())
            self.count += int(diff.numel())

    def compute(self) -> dict[str, float]:
        """``logprob_abs_diff_max`` / ``logprob_abs_diff_mean`` since the last reset."""
        return {
            "logprob_abs_diff_max": self.worst,
            "logprob_abs_diff_mean": self.total / self.count if self.count else 0.0,
        }

    def reset(self) -> None:
        """Forget the accumulated differences."""
        self.worst, self.total, self.count = 0.0, 0.0, 0
