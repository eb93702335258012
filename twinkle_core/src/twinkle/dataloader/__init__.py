"""Data loaders: ``from twinkle.dataloader import DataLoader``."""

from twinkle._kinds import kind_module

_BUILTIN: dict[str, dict[str, str]] = {
    "dataloader": {
        "DataLoader": "twinkle.dataloader.base:DataLoader",
    },
}

__getattr__, __dir__ = kind_module(
    __name__,
    ("dataloader",),
    {
        "RetrySampler": "twinkle.dataloader.sampler:RetrySampler",
        "RowLoadError": "twinkle.dataloader.sampler:RowLoadError",
    },
)
