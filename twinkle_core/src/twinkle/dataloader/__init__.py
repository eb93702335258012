"""Data loaders: ``from twinkle.dataloader import DataLoader``."""

from typing import TYPE_CHECKING

_BUILTIN: dict[str, dict[str, str]] = {
    "dataloader": {
        "DataLoader": "twinkle.dataloader.base:DataLoader",
    },
}

_EXPORTS = {
    "RetrySampler": "twinkle.dataloader.sampler:RetrySampler",
    "RowLoadError": "twinkle.dataloader.sampler:RowLoadError",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names resolve lazily (PEP 562)
    from twinkle.dataloader.base import DataLoader as DataLoader
    from twinkle.dataloader.sampler import RetrySampler as RetrySampler
    from twinkle.dataloader.sampler import RowLoadError as RowLoadError
else:
    from twinkle._kinds import kind_module

    __getattr__, __dir__ = kind_module(__name__, _EXPORTS)
