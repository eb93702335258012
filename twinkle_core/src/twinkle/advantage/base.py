"""The Advantage protocol."""

from __future__ import annotations


class Advantage:
    """Base of advantage estimators."""
