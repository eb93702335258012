"""Datasets: ``from twinkle.dataset import Dataset, DatasetMeta``."""

from typing import TYPE_CHECKING

_BUILTIN: dict[str, dict[str, str]] = {
    "dataset": {
        "Dataset": "twinkle.dataset.base:Dataset",
        "PackingDataset": "twinkle.dataset.packing:PackingDataset",
        "IterableDataset": "twinkle.dataset.iterable:IterableDataset",
    },
}

_EXPORTS = {
    "DatasetMeta": "twinkle.dataset.meta:DatasetMeta",
    "DatasetBase": "twinkle.dataset.base:DatasetBase",
    "pack_bins": "twinkle.dataset.packing:pack_bins",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names resolve lazily (PEP 562)
    from twinkle.dataset.base import Dataset as Dataset
    from twinkle.dataset.base import DatasetBase as DatasetBase
    from twinkle.dataset.iterable import IterableDataset as IterableDataset
    from twinkle.dataset.meta import DatasetMeta as DatasetMeta
    from twinkle.dataset.packing import PackingDataset as PackingDataset
    from twinkle.dataset.packing import pack_bins as pack_bins
else:
    from twinkle._kinds import kind_module

    __getattr__, __dir__ = kind_module(__name__, _EXPORTS)
