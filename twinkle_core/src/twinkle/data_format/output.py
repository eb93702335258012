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

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"ModelOutput has no field {name!r}; fields: {', '.join(self) or '(none)'}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value
