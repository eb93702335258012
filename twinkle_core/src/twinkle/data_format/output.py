"""ModelOutput: what a model backend returns from forward / forward_only / forward_backward."""

from __future__ import annotations

from typing import Any


class ModelOutput(dict):
    """A dict with attribute access, returned by every model backend.

    Being a plain ``dict`` keeps it cheap on the hot path and lets remote launchers
    collect it (``collect='mean'`` averages the numbers of several data ranks and
    concatenates per-row lists).

    Common keys (each present only when it makes sense):

    * ``loss`` (float): the loss of this call, normalized by ``num_tokens``.
    * ``num_tokens`` (int): how many label tokens the loss covers.
    * ``logits`` (tensor ``[B, T, V]``): only from :meth:`TwinkleModel.forward`.
    * ``logps`` (``list[list[float]]``): per row, the log-probability of each label token,
      aligned with the row's ``labels`` (0.0 where the label is -100).
    * ``token_acc`` (float): share of label tokens predicted by argmax.

    Example::

        out = model.forward_backward(inputs=batch)
        print(out.loss, out["num_tokens"])
    """

    def label_logps(self, labels: Any) -> Any:
        """Per-token log-probabilities of ``labels`` computed by the backend itself, or ``None``.

        ``None`` here: the output holds ``logits`` and a loss computes them from those
        (:func:`twinkle.loss.base.token_logps`). A backend that skips the full logits returns an
        output that overrides this (e.g. :class:`twinkle.patch.fastpath.HiddenStatesOutput`:
        from the hidden states and the LM head, in chunks), so losses never need to know how.

        Args:
            labels: ``[B, T]`` target ids, ``-100`` = ignored.

        Returns:
            ``[B, T]`` float32 log-probabilities (0 where ignored, differentiable), or ``None``.
        """
        return None

    def label_cross_entropy_sum(self, labels: Any, label_smoothing: float = 0.0, num_labels: Any = None) -> Any:
        """The summed token cross-entropy of ``labels`` computed by the backend itself, or ``None``.

        ``None`` here (the loss uses ``logits``); see :meth:`label_logps`. An override may also
        leave ``self["predictions"]`` (argmax ids, ``-1`` where ignored) for accuracy metrics.

        Args:
            labels: ``[B, T]`` target ids, ``-100`` = ignored.
            label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
            num_labels: how many labels are not ``-100``, when the caller knows (saves a sync).

        Returns:
            A float32 scalar tensor (a sum, differentiable), or ``None``.
        """
        return None

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"ModelOutput has no field {name!r}; fields: {', '.join(self) or '(none)'}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value
