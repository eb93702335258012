"""Progress bars with rate and ETA for twinkle's long operations and the examples.

``progress(iterable, desc=..., unit=...)`` is a ``tqdm`` bar on a terminal and silent
otherwise: in CI logs, under ``nohup`` or when output is piped, nothing is printed.
``TWINKLE_PROGRESS=1`` forces bars on, ``TWINKLE_PROGRESS=0`` turns them off. Without tqdm
(the torch-free core does not need it) the bar is a silent stand-in with the same methods.

Example::

    from twinkle.progress import progress

    for batch in progress(dataloader, desc="sft", unit="batch"):
        ...
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import IO, Any, Iterable, Iterator


def enabled(file: IO[str] | None = None) -> bool:
    """Whether a bar should draw on ``file`` (default stderr): ``TWINKLE_PROGRESS``, else is it a TTY."""
    forced = os.environ.get("TWINKLE_PROGRESS", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    stream = file if file is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


class QuietBar:
    """The tqdm methods twinkle and the examples use, doing nothing but counting."""

    def __init__(self, iterable: Iterable[Any] | None = None, total: int | None = None, **_: Any) -> None:
        self.iterable, self.total, self.n = iterable, total, 0
        self.disable = True

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.n += 1

    def __len__(self) -> int:
        if self.total is not None:
            return self.total
        return len(self.iterable)  # type: ignore[arg-type]

    def __enter__(self) -> QuietBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass

    def write(self, message: str, file: IO[str] | None = None, **_: Any) -> None:
        print(message, file=file if file is not None else sys.stdout)

    def close(self) -> None:
        pass


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    file: IO[str] | None = None,
    **kwargs: Any,
) -> Any:
    """A tqdm bar (rate, ETA) over ``iterable`` on a terminal; a :class:`QuietBar` elsewhere.

    Args:
        iterable: what to iterate (or None and call ``update(n)``).
        total: the expected count (default ``len(iterable)`` when it has one).
        desc: the bar's label, e.g. ``"encode"``.
        unit: what one step is, e.g. ``"row"``, ``"batch"``, ``"B"`` (with ``unit_scale=True``).
        file: the stream to draw on (default stderr); its ``isatty()`` decides.
        **kwargs: more tqdm options (``unit_scale``, ``leave``, ``mininterval`` ...).
    """
    if not enabled(file):
        return QuietBar(iterable, total=total)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return QuietBar(iterable, total=total)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=file if file is not None else sys.stderr, **kwargs)


#: Libraries with their own tqdm bars: module -> (are-disabled function, disable, enable).
_LIBRARY_BARS = {
    "datasets": ("are_progress_bars_disabled", "disable_progress_bars", "enable_progress_bars"),
    "huggingface_hub.utils": ("are_progress_bars_disabled", "disable_progress_bars", "enable_progress_bars"),
}


@contextmanager
def library_bars(
    file: IO[str] | None = None, *, libraries: tuple[str, ...] | None = None, import_missing: bool = False
) -> Iterator[None]:
    """Inside the block, the bars of ``datasets`` (encode, map) and ``huggingface_hub`` (downloads)
    follow twinkle's rule: drawn on a terminal, off when the output is not one.

    ``libraries`` narrows the set (``("huggingface_hub.utils",)``). Only libraries already
    imported are touched (``import_missing=True``: installed ones too); their previous setting
    comes back afterwards.
    """
    if enabled(file):
        yield
        return
    import importlib

    turned_off = []
    for name, (are_disabled, disable, _enable) in _LIBRARY_BARS.items():
        if libraries is not None and name not in libraries:
            continue
        if name.split(".")[0] not in sys.modules and not import_missing:
            continue
        try:
            module = importlib.import_module(name)
            if not getattr(module, are_disabled)():
                getattr(module, disable)()
                turned_off.append(module)
        except (ImportError, AttributeError):  # another version without these switches
            continue
    try:
        yield
    finally:
        for module in turned_off:
            name = module.__name__.split(".")[0]
            getattr(module, _LIBRARY_BARS["datasets" if name == "datasets" else "huggingface_hub.utils"][2])()
