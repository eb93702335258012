"""DataLoader: global batches of encoded rows, sliced per data-parallel rank, resumable.

``batch_size`` is the global batch. Iterating yields ``list[dict]`` (the rows as the
dataset holds them: ``input_ids``, ``labels``, ``length``, plus kept columns such as
``messages`` or ``user_data``); collation into tensors is the model's InputProcessor's job.

In local mode under torchrun, with a DeviceMesh (``device_mesh=`` or the runtime's global
mesh), each process yields only its data rank's contiguous slice of every global batch
(:func:`twinkle.dispatch.slice_for_data_rank`); tensor/pipeline peers get the same slice.

Example::

    loader = DataLoader(dataset=dataset, batch_size=8, min_batch_size=8, shuffle=True, seed=42)
    for batch in loader:
        model.forward_backward(inputs=batch)
    state = loader.state_dict()          # save with the checkpoint
    loader.load_state_dict(state)        # resume exactly after the last consumed batch
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Iterator

from twinkle.component import Component
from twinkle.dataloader.sampler import RetrySampler, epoch_order
from twinkle.dispatch import remote, slice_for_data_rank

logger = logging.getLogger("twinkle.dataloader")


class DataLoader(Component):
    """Batches a Dataset: global batch size, data-rank slicing, seeded shuffling, exact resume.

    Args:
        dataset: a :class:`~twinkle.dataset.Dataset` (anything with ``__len__`` and
            ``__getitem__``) or a streaming :class:`~twinkle.dataset.IterableDataset`.
        batch_size: the global batch size (all data-parallel ranks together).
        min_batch_size: a last batch with fewer rows is dropped (``None``: keep it).
        shuffle: shuffle rows every epoch (map-style data sets).
        seed: the shuffle seed; ``None``: the runtime's seed, else a random one (kept in
            :meth:`state_dict`, so resuming is still exact).
        drop_last: drop any incomplete last batch.
        device_mesh: the DeviceMesh of the consumer; default: the runtime's global mesh.
        rank: this process's global rank; default: ``$RANK`` (torchrun), and no slicing
            when neither is set.
        max_retries: replacements tried for a row that fails to load (counted in
            :attr:`skipped_rows`).
        remote_group: the DeviceGroup to place it on (ray/http modes).

    Raises:
        ValueError: a non-positive batch size, ``min_batch_size > batch_size``, or a batch
            size that does not split over the data ranks.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        min_batch_size: int | None = None,
        shuffle: bool = False,
        seed: int | None = None,
        drop_last: bool = False,
        device_mesh: Any = None,
        rank: int | None = None,
        max_retries: int = 3,
        remote_group: str | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer (the global batch), got {batch_size!r}")
        if min_batch_size is not None and not 1 <= min_batch_size <= batch_size:
            raise ValueError(f"min_batch_size={min_batch_size} must be between 1 and batch_size={batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.min_batch_size = min_batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.remote_group = remote_group
        self.streaming = not hasattr(dataset, "__getitem__") or getattr(dataset, "streaming", False)
        if shuffle and self.streaming:
            raise ValueError(
                "shuffle=True needs random access; for a streaming IterableDataset call "
                "dataset.shuffle(seed=..., buffer_size=...) and leave the DataLoader's shuffle off"
            )
        runtime = _current_runtime()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if seed is None:
            if runtime is not None and runtime.seed is not None:
                seed = runtime.seed
            else:  # every torchrun rank must shuffle the same way: a fixed default there
                seed = 42 if world > 1 else random.randrange(2**31)
        self.seed = seed
        if device_mesh is None and runtime is not None:
            device_mesh = runtime.global_device_mesh
        if device_mesh is None and world > 1:
            # the same default as the model backends: plain data parallel over every torchrun rank
            from twinkle.mesh import DeviceMesh

            device_mesh = DeviceMesh.from_sizes(dp_size=world)
        self.device_mesh = device_mesh
        if rank is None and os.environ.get("RANK") is not None:
            rank = int(os.environ["RANK"])
        self.rank = rank
        if device_mesh is not None and rank is not None and device_mesh.data_world_size > 1:
            self.data_rank = device_mesh.data_rank(rank)
            self.data_world_size = device_mesh.data_world_size
        else:
            self.data_rank, self.data_world_size = 0, 1
        if batch_size % self.data_world_size:
            raise ValueError(
                f"batch_size={batch_size} does not split over {self.data_world_size} data-parallel ranks; "
                f"use a multiple of {self.data_world_size}"
            )
        self._retry = RetrySampler(self._fetch, max_retries=max_retries)
        self.epoch = 0
        self.consumed = 0  # positions of this epoch's order consumed (whole global batches)

    # -- sizes -------------------------------------------------------------------------
    def _batch_sizes(self, num_rows: int) -> list[int]:
        full, tail = divmod(num_rows, self.batch_size)
        sizes = [self.batch_size] * full
        if tail and not self.drop_last and (self.min_batch_size is None or tail >= self.min_batch_size):
            tail -= tail % self.data_world_size  # every data rank gets as many rows
            if tail:
                sizes.append(tail)
        return sizes

    @remote()
    def __len__(self) -> int:
        """Batches per epoch.

        Raises:
            TypeError: the data set is streaming (its length is unknown).
        """
        if self.streaming:
            raise TypeError("a DataLoader over a streaming IterableDataset has no length; count steps yourself")
        length = len(self._batch_sizes(len(self.dataset)))
        from twinkle.runtime import current_runtime

        runtime = current_runtime()
        if runtime is not None:  # set_lr_scheduler warns when a schedule is sized in batches
            runtime.dataloader_lengths.add(length)
        return length

    @property
    def skipped_rows(self) -> int:
        """Rows that failed to load and were replaced, so far."""
        return self._retry.skipped

    # -- iteration -----------------------------------------------------------------------
    def _fetch(self, index: int) -> Any:
        return self.dataset[index]

    @remote(iterator=True, collect="flatten")
    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        """Yield this process's slice of each remaining global batch of the current epoch, then advance the epoch.

        In ray mode a DataLoader placed on a group runs one actor per data rank, each
        loading its slice; ``collect="flatten"`` hands the caller the whole global batch.

        After :meth:`load_state_dict`, iteration continues right after the last consumed
        batch.
        """
        if self.streaming:
            yield from self._iter_stream()
            return
        num_rows = len(self.dataset)
        order = epoch_order(num_rows, self.shuffle, self.seed, self.epoch)
        position = 0
        for size in self._batch_sizes(num_rows):
            start, position = position, position + size
            if start < self.consumed:
                continue
            mine = slice_for_data_rank(list(range(start, start + size)), self.data_rank, self.data_world_size)
            batch = [self._retry.get(order, p) for p in mine]
            self.consumed = start + size
            yield batch
        self.epoch += 1
        self.consumed = 0

    def _iter_stream(self) -> Iterator[list[dict[str, Any]]]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        rows = iter(self.dataset)
        skipped = 0
        while skipped < self.consumed:  # resume: skip what was consumed already
            if next(rows, None) is None:
                break
            skipped += 1
        while True:
            batch = []
            for row in rows:
                batch.append(row)
                if len(batch) == self.batch_size:
                    break
            if len(batch) < self.batch_size:
                sizes = self._batch_sizes(len(batch))
                if not sizes:
                    break
                batch = batch[: sizes[0]]
            self.consumed += len(batch)
            yield slice_for_data_rank(batch, self.data_rank, self.data_world_size)
            if len(batch) < self.batch_size:
                break
        self.epoch += 1
        self.consumed = 0

    # -- resume --------------------------------------------------------------------------
    @remote()
    def state_dict(self) -> dict[str, Any]:
        """Where iteration stands: ``{'epoch', 'consumed_samples', 'seed', 'batch_size', 'skipped_rows'}``."""
        return {
            "epoch": self.epoch,
            "consumed_samples": self.consumed,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "skipped_rows": self.skipped_rows,
        }

    @remote()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the next batch is the one after the last consumed.

        Raises:
            ValueError: the state was saved with another batch size or shuffle setting,
                which would not resume exactly.
        """
        for key in ("batch_size", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume exactly: the state was saved with {key}={state[key]!r}, this DataLoader has "
                    f"{key}={getattr(self, key)!r}"
                )
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed_samples"])
        self.seed = int(state["seed"])
        self._retry.skipped = int(state.get("skipped_rows", 0))

    def __repr__(self) -> str:
        return (
            f"DataLoader(batch_size={self.batch_size}, data_rank={self.data_rank}/{self.data_world_size}, "
            f"shuffle={self.shuffle}, seed={self.seed}, epoch={self.epoch}, consumed={self.consumed})"
        )


def _current_runtime() -> Any:
    from twinkle.runtime import current_runtime

    return current_runtime()
