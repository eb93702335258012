"""Small helpers with no third-party imports."""

from __future__ import annotations

import difflib
import importlib
from typing import Any


def import_target(target: Any) -> Any:
    """Import a ``"package.module:attr"`` string (``attr`` may be dotted); pass objects through."""
    if not isinstance(target, str):
        return target
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"target {target!r} must look like 'package.module:attr'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def describe_target(target: Any) -> str:
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or type(target).__module__
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}:{qualname}"


def close_matches(word: str, candidates: list[str], n: int = 3) -> list[str]:
    """Close matches, case-insensitively, best first."""
    lowered = {c.lower(): c for c in candidates}
    hits = difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=0.6)
    prefix = [c for c in candidates if c.lower().startswith(word.lower()) and c.lower() not in hits]
    return [lowered[h] for h in hits] + prefix[: max(0, n - len(hits))]
