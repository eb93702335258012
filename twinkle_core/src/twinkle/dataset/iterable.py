"""IterableDataset: the same pipeline as :class:`Dataset`, streamed (rows are read and processed lazily)."""

from __future__ import annotations

from typing import Any, Iterator

from twinkle.dataset.base import DatasetBase
from twinkle.dispatch import remote


class IterableDataset(DatasetBase):
    """A streaming data set: ``map``/``filter``/``encode`` run as rows are read; no ``len``.

    Built on ``datasets.load_dataset(..., streaming=True)``, so data larger than memory or
    disk works, local files included. ``data_slice`` must be contiguous (``range(a, b)``).
    A DataLoader over it yields batches until the stream ends.

    Args:
        dataset_meta, remote_group, device_mesh: as :class:`~twinkle.dataset.Dataset`.

    Example::

        stream = IterableDataset(dataset_meta=DatasetMeta("big.jsonl"))
        stream.set_template("Template", model_id=model_dir)
        stream.map("AlpacaProcessor").encode()
        next(iter(stream))["input_ids"]
    """

    streaming = True

    def __init__(self, dataset_meta: Any = None, *, remote_group: str | None = None, device_mesh: Any = None) -> None:
        super().__init__(dataset_meta, remote_group=remote_group, device_mesh=device_mesh)

    @remote(iterator=True)
    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Rows as dicts, processed on the fly."""
        return iter(self.dataset)

    def __len__(self) -> int:
        raise TypeError(
            "a streaming IterableDataset has no length; iterate it, or load it with Dataset(...) to count rows"
        )

    @remote()
    def shuffle(self, seed: int | None = None, buffer_size: int = 1000) -> IterableDataset:
        """Shuffle approximately, with a buffer of ``buffer_size`` rows; deterministic for a seed."""
        self.parts = {key: part.shuffle(seed=seed, buffer_size=buffer_size) for key, part in self.parts.items()}
        return self

    @remote()
    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffle buffer for ``epoch`` (each epoch gets another order)."""
        for part in self.parts.values():
            part.set_epoch(epoch)
