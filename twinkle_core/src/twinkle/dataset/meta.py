"""DatasetMeta: which data set to load, and which part of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

DataSlice = range | slice | Sequence[int] | None


@dataclass
class DatasetMeta:
    """Where a data set comes from and which rows of it to use.

    Args:
        dataset_id: a local file (``.json``/``.jsonl``/``.csv``/``.parquet``/``.txt``/
            ``.arrow``), a local directory (data files, or a set saved with
            ``Dataset.save``), ``ms://org/name`` (ModelScope), ``hf://org/name`` (Hugging
            Face), or any name when ``rows`` are given.
        subset_name: the configuration/subset of a hub or directory data set.
        split: the split to load (a single file only has ``'train'``).
        data_slice: which rows: a ``range`` or a list of indices (indices past the end
            wrap around, so ``range(1000)`` over 150 rows oversamples them), or a
            ``slice`` (clipped to the data).
        rows: in-memory rows (a list of dicts) instead of loading ``dataset_id``.
        revision: a hub branch, tag or commit.

    Example::

        DatasetMeta("ms://swift/self-cognition", data_slice=range(1000))
        DatasetMeta("data/train.jsonl", split="train")
        DatasetMeta("my-rows", rows=[{"query": "hi", "response": "hello"}])
    """

    dataset_id: str
    subset_name: str | None = None
    split: str = "train"
    data_slice: DataSlice = None
    rows: list[dict[str, Any]] | None = field(default=None, repr=False)
    revision: str | None = None

    def __post_init__(self) -> None:
        import os

        if isinstance(self.dataset_id, os.PathLike):
            self.dataset_id = os.fspath(self.dataset_id)
        if not isinstance(self.dataset_id, str) or not self.dataset_id:
            raise ValueError(f"DatasetMeta: dataset_id must be a non-empty string, got {self.dataset_id!r}")
        if self.rows is not None and not isinstance(self.rows, list):
            raise ValueError(f"DatasetMeta: rows must be a list of dicts, got {type(self.rows).__name__}")
        if self.data_slice is not None and not isinstance(self.data_slice, (range, slice, list, tuple)):
            raise ValueError(
                f"DatasetMeta: data_slice must be a range, a slice or a list of indices, got {self.data_slice!r}"
            )

    @property
    def key(self) -> str:
        """A readable name for this part of a Dataset (``id[:subset][:split]``)."""
        parts = [self.dataset_id]
        if self.subset_name:
            parts.append(self.subset_name)
        if self.split != "train":
            parts.append(self.split)
        return ":".join(parts)

    def indices(self, num_rows: int) -> list[int] | None:
        """The row indices ``data_slice`` selects from ``num_rows`` rows (``None``: all).

        Raises:
            ValueError: the data set is empty, or an index is negative.
        """
        if self.data_slice is None:
            return None
        if isinstance(self.data_slice, slice):
            return list(range(*self.data_slice.indices(num_rows)))
        if num_rows == 0:
            raise ValueError(f"{self.key}: data_slice={self.data_slice!r} selects rows from an empty data set")
        indices = list(self.data_slice)
        if any(not isinstance(i, int) or i < 0 for i in indices):
            raise ValueError(f"{self.key}: data_slice indices must be non-negative integers")
        return [i % num_rows for i in indices]
