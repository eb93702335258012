"""Helpers for the data pipeline tests."""

from __future__ import annotations


def trained_text(template, feature: dict) -> str:
    """The text of the tokens that carry a label."""
    return template.decode([t for t in feature["labels"] if t != -100], skip_special_tokens=False)
