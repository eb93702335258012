"""Encoded rows: :class:`InputFeature`, what a Template produces and a DataLoader batches.

A plain-dict ``TypedDict``. ``labels`` has the same length as ``input_ids`` and holds
``-100`` (:data:`IGNORE_INDEX`) on tokens that are not trained (system, user, tool and
template tokens); the loss shifts them by one position itself.

Example::

    feature: InputFeature = {"input_ids": [1, 5, 9, 2], "labels": [-100, -100, 9, 2], "length": 4}
"""

from __future__ import annotations

from typing import TypedDict

try:  # Python 3.11+
    from typing import NotRequired, Required
except ImportError:  # pragma: no cover - Python 3.10
    from typing_extensions import NotRequired, Required

#: The label of a token that is not trained (PyTorch's cross-entropy ``ignore_index``).
IGNORE_INDEX = -100


class InputFeature(TypedDict, total=False):
    """One encoded sequence (or several packed into one row).

    Fields:
        input_ids: token ids.
        labels: per-token targets, ``-100`` where not trained; same length as ``input_ids``.
        attention_mask: 1 for real tokens (optional; collation builds it).
        position_ids: positions; in a packed row they restart at 0 for every packed
            sequence, which is how sequence boundaries are recorded.
        length: ``len(input_ids)``.
        rejected_input_ids, rejected_labels, rejected_length: the rejected side of a
            preference pair (DPO), when the trajectory had ``rejected_messages``.
    """

    input_ids: Required[list[int]]
    labels: Required[list[int]]
    attention_mask: NotRequired[list[int]]
    position_ids: NotRequired[list[int]]
    length: NotRequired[int]
    rejected_input_ids: NotRequired[list[int]]
    rejected_labels: NotRequired[list[int]]
    rejected_length: NotRequired[int]
