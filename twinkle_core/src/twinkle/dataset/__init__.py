"""Datasets: ``from twinkle.dataset import Dataset, DatasetMeta``."""

from twinkle._kinds import kind_module

_BUILTIN: dict[str, dict[str, str]] = {
    "dataset": {
        "Dataset": "twinkle.dataset.base:Dataset",
    },
}

__getattr__, __dir__ = kind_module(__name__, ("dataset",), {"DatasetMeta": "twinkle.dataset.meta:DatasetMeta"})
