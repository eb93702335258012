"""Preprocessor and Filter protocols."""

from __future__ import annotations


class Preprocessor:
    """Turns raw rows into Trajectories."""


class Filter:
    """Decides which rows to keep."""
