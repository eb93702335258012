"""PackingDataset: bin-pack encoded rows into rows of up to ``max_length`` tokens.

A packed row concatenates several encoded sequences::

    {"input_ids": [...a..., ...b...], "labels": [...], "position_ids": [0, 1, .., 0, 1, ..], "length": n}

``position_ids`` restart at 0 for every packed sequence: that is the sequence boundary a
padding-free collator (``InputProcessor``) turns into ``cu_seqlens`` for varlen attention.
Packing is deterministic (best-fit decreasing by length, ties by row order).
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence

from twinkle.dataset.base import Dataset
from twinkle.dispatch import remote

PACKED_COLUMNS: tuple[str, ...] = ("input_ids", "labels", "position_ids", "length")


def pack_bins(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group row indices into bins whose total length is at most ``max_length`` (best-fit decreasing).

    Args:
        lengths: the length of each row.
        max_length: the capacity of a bin.

    Returns:
        Bins of row indices; every index appears exactly once; inside a bin, indices are
        in ascending order; bins are ordered by their first index.

    Raises:
        ValueError: a row is longer than ``max_length``.

    Example::

        pack_bins([3, 5, 2, 4], 8)  # [[0, 1], [2, 3]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted
    bins: list[list[int]] = []
    for i in order:
        length = lengths[i]
        if length > max_length:
            raise ValueError(
                f"row {i} has {length} tokens, more than the packing length {max_length}; truncate it first "
                f"(set_template(..., max_length={max_length}, truncation_strategy='left'|'right'|'delete'))"
            )
        k = bisect.bisect_left(free, (length, -1))
        if k < len(free):
            remaining, b = free.pop(k)
            bins[b].append(i)
            remaining -= length
        else:
            b = len(bins)
            bins.append([i])
            remaining = max_length - length
        if remaining > 0:
            bisect.insort(free, (remaining, b))
    for b in bins:
        b.sort()
    bins.sort(key=lambda b: b[0])
    return bins


def pack_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate encoded rows into one packed row (input_ids, labels, position_ids, length)."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for row in rows:
        ids = row["input_ids"]
        input_ids.extend(ids)
        labels.extend(row["labels"])
        position_ids.extend(range(len(ids)))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "length": len(input_ids)}


class PackingDataset(Dataset):
    """A :class:`Dataset` whose :meth:`encode` also packs rows into ``packing_length``-token rows.

    Args:
        dataset_meta, num_proc, remote_group, device_mesh: as :class:`Dataset`.
        packing_length: the packed row length; default: the Template's ``max_length``.

    Only ``input_ids``, ``labels``, ``position_ids`` and ``length`` survive packing.

    Example::

        dataset = PackingDataset(dataset_meta=DatasetMeta(path), packing_length=512)
        dataset.set_template("Template", model_id=model_dir, max_length=512, truncation_strategy="right")
        dataset.map("AlpacaProcessor").encode()      # encodes, then packs
        dataset[0]["position_ids"]                    # [0, 1, ..., 0, 1, ...]
    """

    def __init__(
        self,
        dataset_meta: Any = None,
        *,
        packing_length: int | None = None,
        num_proc: int | None = None,
        remote_group: str | None = None,
        device_mesh: Any = None,
    ) -> None:
        super().__init__(dataset_meta, num_proc=num_proc, remote_group=remote_group, device_mesh=device_mesh)
        self.packing_length = packing_length

    @remote()
    def encode(self, dataset_meta: Any = None, **kwargs: Any) -> PackingDataset:
        """Encode (see :meth:`Dataset.encode`), then :meth:`pack`."""
        super().encode(dataset_meta, **kwargs)
        return self.pack(dataset_meta)

    @remote()
    def pack(self, dataset_meta: Any = None, packing_length: int | None = None) -> PackingDataset:
        """Bin-pack the encoded rows of every part (or one) into rows of at most ``packing_length`` tokens.

        Raises:
            ValueError: no packing length (pass ``packing_length`` or a Template
                ``max_length``), rows not encoded, or a row longer than the packing length.
        """
        import datasets

        limit = packing_length or self.packing_length or (self.template.max_length if self.template else None)
        if not limit:
            raise ValueError(
                "PackingDataset needs a packing length: PackingDataset(..., packing_length=N) or "
                "set_template(..., max_length=N)"
            )
        for key in self._selected(dataset_meta):
            part = self.parts[key]
            if "input_ids" not in part.column_names:
                raise ValueError(f"{key}: rows are not encoded; call encode() before pack()")
            lengths = part["length"] if "length" in part.column_names else [len(x) for x in part["input_ids"]]
            bins = pack_bins(list(lengths), limit)
            columns = part.select_columns(["input_ids", "labels"])
            packed: dict[str, list[Any]] = {name: [] for name in PACKED_COLUMNS}
            for b in bins:
                row = pack_rows([columns[i] for i in b])
                for name in PACKED_COLUMNS:
                    packed[name].append(row[name])
            self.parts[key] = datasets.Dataset.from_dict(packed)
        return self
