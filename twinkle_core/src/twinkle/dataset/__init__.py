"""Datasets: ``from twinkle.dataset import Dataset, DatasetMeta``."""

from twinkle._kinds import kind_module

_BUILTIN: dict[str, dict[str, str]] = {
    "dataset": {
        "Dataset": "twinkle.dataset.base:Dataset",
        "PackingDataset": "twinkle.dataset.packing:PackingDataset",
        "IterableDataset": "twinkle.dataset.iterable:IterableDataset",
    },
}

__getattr__, __dir__ = kind_module(
    __name__,
    ("dataset",),
    {
        "DatasetMeta": "twinkle.dataset.meta:DatasetMeta",
        "DatasetBase": "twinkle.dataset.base:DatasetBase",
        "pack_bins": "twinkle.dataset.packing:pack_bins",
    },
)
