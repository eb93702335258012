"""The remote seam: how a component's public methods spread over a mesh.

Components declare, as plain metadata, how each public method dispatches its arguments
to the ranks of the component's DeviceMesh and how the per-rank results are collected.
Core's local launcher ignores it (one process calls the method directly); the Ray
launcher (twinkle-ray) and the HTTP client read it to turn a component into actors or a
remote proxy without changing user code.

Example::

    class MyModel(Component):
        @remote(dispatch="slice_dp", collect="mean")
        def forward_backward(self, inputs): ...

        @remote(dispatch="all", collect="first")
        def set_optimizer(self, optimizer_cls, **kwargs): ...

Dispatch modes:

* ``all``: every rank gets the same arguments.
* ``slice_dp``: the first positional argument (or ``inputs=``) is a list/batch, split into
  ``mesh.data_world_size`` contiguous slices; rank r gets slice ``mesh.data_rank(r)``, so
  tensor/pipeline peers get the same slice.
* ``first``: only rank 0 runs it.

Collect modes:

* ``first``: rank 0's result.  ``last_pp``: the first data leader on the last pipeline stage.
* ``mean``: mean of the data leaders' numbers (dicts per key; per-row lists are concatenated).
* ``flatten``: concatenation of the data leaders' list results, in data-rank order.
* ``all``: the list of every rank's result.
* ``none``: ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

DISPATCH_MODES = ("all", "slice_dp", "first")
COLLECT_MODES = ("first", "last_pp", "mean", "flatten", "all", "none")

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class RemoteSpec:
    """How one method is dispatched and collected."""

    name: str
    dispatch: str = "all"
    collect: str = "first"
    #: the method returns an iterator the caller consumes (e.g. ``DataLoader.__iter__``).
    iterator: bool = False


def remote(dispatch: str = "all", collect: str = "first", *, iterator: bool = False) -> Callable[[F], F]:
    """Mark a public method with its dispatch/collect modes (see the module docstring)."""
    if dispatch not in DISPATCH_MODES:
        raise ValueError(f"dispatch={dispatch!r} must be one of {DISPATCH_MODES}")
    if collect not in COLLECT_MODES:
        raise ValueError(f"collect={collect!r} must be one of {COLLECT_MODES}")

    def mark(fn: F) -> F:
        fn.__twinkle_remote__ = RemoteSpec(fn.__name__, dispatch, collect, iterator)  # type: ignore[attr-defined]
        return fn

    return mark


def remote_methods(cls: type) -> dict[str, RemoteSpec]:
    """Every method of ``cls`` (and its bases) marked with :func:`remote`, by name."""
    specs: dict[str, RemoteSpec] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            spec = getattr(value, "__twinkle_remote__", None)
            if spec is not None:
                specs[name] = spec
    return specs


def slice_for_data_rank(batch: Any, data_rank: int, data_world_size: int) -> Any:
    """Contiguous slice ``data_rank`` of ``data_world_size`` of a list-like batch.

    Raises:
        ValueError: the batch does not split evenly (every data rank must get as many rows).
    """
    if data_world_size == 1:
        return batch
    n = len(batch)
    if n % data_world_size:
        raise ValueError(
            f"a batch of {n} rows does not split evenly over {data_world_size} data-parallel ranks; "
            f"use a global batch size divisible by {data_world_size}"
        )
    per = n // data_world_size
    return batch[data_rank * per : (data_rank + 1) * per]


def collect_results(mode: str, results: Sequence[Any], leaders: Sequence[int], last_pp: Sequence[int]) -> Any:
    """Combine per-rank ``results`` per ``mode``. ``leaders``: the data-leader ranks, in data-rank order."""
    if mode == "none":
        return None
    if mode == "all":
        return list(results)
    if mode == "first":
        return results[0]
    if mode == "last_pp":
        return results[last_pp[0]]
    chosen = [results[r] for r in leaders]
    if mode == "flatten":
        out: list[Any] = []
        for part in chosen:
            out.extend(part)
        return out
    if mode == "mean":
        return _mean(chosen)
    raise ValueError(f"unknown collect mode {mode!r}")


def _mean(values: Sequence[Any]) -> Any:
    """Mean of the data leaders' results.

    Numbers are averaged (equal integers stay integers); dicts (``ModelOutput`` too, whose
    type is kept) are combined per key; lists, such as per-row ``logps``, are concatenated
    in data-rank order; anything else is taken from the first leader.
    """
    first = values[0]
    if isinstance(first, dict):
        combined = {k: _mean([v[k] for v in values]) if all(k in v for v in values) else first[k] for k in first}
        try:
            return type(first)(combined)
        except TypeError:
            return combined
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        if all(isinstance(v, int) and not isinstance(v, bool) and v == first for v in values):
            return first
        return sum(values) / len(values)
    if isinstance(first, list) and all(isinstance(v, list) for v in values):
        out: list[Any] = []
        for part in values:
            out.extend(part)
        return out
    return first
