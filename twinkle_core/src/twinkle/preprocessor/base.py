"""Preprocessor and Filter protocols: raw rows -> Trajectories, and which rows to keep.

One call signature each:

* ``preprocessor(rows: list[dict]) -> list[dict]``: a batch of raw rows in, the
  Trajectories (``{'messages': [...], 'tools'?, 'user_data'?, 'rejected_messages'?}``)
  out. Usually fewer or as many rows; a subclass implements :meth:`Preprocessor.preprocess`
  for one row and the base class handles the batch, bad rows and the drop count.
* ``filter(row: dict) -> bool``: keep the row or not. Plain functions work too.

Bad rows never pass silently: a subclass raises :class:`BadRowError` naming the field and
the problem; with ``on_bad_row='raise'`` (default) the error reaches the user with the row
index, with ``on_bad_row='drop'`` the row is dropped, counted and logged.

Example::

    class UpperProcessor(Preprocessor):
        def preprocess(self, row):
            text = self.text(row, "text")
            return {"messages": [{"role": "user", "content": text},
                                 {"role": "assistant", "content": text.upper()}]}

    UpperProcessor()([{"text": "hi"}])  # [{'messages': [...]}]
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

logger = logging.getLogger("twinkle.preprocessor")

BAD_ROW_POLICIES: tuple[str, ...] = ("raise", "drop")


class BadRowError(ValueError):
    """A raw row a preprocessor or filter cannot use.

    Attributes:
        field: the column at fault.
        problem: what is wrong with it.
        index: the row's index (in the batch, then in the data set once ``Dataset.map``
            knows it); ``None`` when unknown.
        fix: how to fix it, if known.
    """

    def __init__(
        self, field: str, problem: str, index: int | None = None, fix: str | None = None, source: str | None = None
    ) -> None:
        self.field = field
        self.problem = problem
        self.index = index
        self.fix = fix
        self.source = source
        super().__init__(self._message())

    def _message(self) -> str:
        source = f"{self.source}: " if self.source else ""
        where = f"row {self.index}: " if self.index is not None else ""
        fix = f" Fix: {self.fix}" if self.fix else ""
        return f"{source}{where}field {self.field!r}: {self.problem}.{fix}"

    def at(self, index: int, source: str | None = None) -> BadRowError:
        """This error re-labelled with ``index`` (and the component that raised it)."""
        self.index = index
        if source is not None:
            self.source = source
        self.args = (self._message(),)
        return self

    def __reduce__(self) -> tuple:
        # worker processes (``num_proc``) send errors back pickled
        return (type(self), (self.field, self.problem, self.index, self.fix, self.source))


class Preprocessor:
    """Turns raw rows into Trajectories: ``preprocessor(rows: list[dict]) -> list[dict]``.

    Subclasses implement :meth:`preprocess` (one row -> a Trajectory, a list of them, or
    ``None`` to drop it) and may use :meth:`text` / :meth:`column` to read fields with
    clear errors.

    Args:
        on_bad_row: ``'raise'`` (default): a bad row stops with a :class:`BadRowError`
            naming the row and field; ``'drop'``: the row is dropped, counted in
            :attr:`dropped` and logged.
    """

    def __init__(self, on_bad_row: str = "raise") -> None:
        if on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"on_bad_row={on_bad_row!r} must be one of {BAD_ROW_POLICIES}")
        self.on_bad_row = on_bad_row
        #: rows dropped by this object so far (in this process).
        self.dropped = 0

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Preprocess a batch of raw rows.

        Args:
            rows: raw rows (dicts of column -> value).

        Returns:
            The Trajectories, in order; dropped rows are left out.

        Raises:
            BadRowError: a bad row with ``on_bad_row='raise'``; ``index`` is its position
                in ``rows``.
        """
        out: list[dict[str, Any]] = []
        for i, row in enumerate(rows):
            try:
                result = self.preprocess(row)
            except BadRowError as exc:
                exc.at(i, type(self).__name__)
                if self.on_bad_row == "raise":
                    raise
                self.dropped += 1
                logger.warning("%s dropped a bad row: %s", type(self).__name__, exc)
                continue
            if result is None:
                self.dropped += 1
                continue
            if isinstance(result, list):
                out.extend(result)
            else:
                out.append(result)
        return out

    def preprocess(self, row: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]] | None:
        """One raw row -> a Trajectory (or a list, or ``None`` to drop). Subclasses override it.

        The default passes rows that already are trajectories (have ``messages``).
        """
        if not isinstance(row.get("messages"), list):
            raise BadRowError("messages", f"missing; the row has {sorted(row)}", fix="use a Preprocessor subclass")
        return row

    # -- helpers for subclasses ------------------------------------------------------
    @staticmethod
    def column(row: dict[str, Any], name: str, fix: str | None = None) -> Any:
        """``row[name]``, or :class:`BadRowError` when the column is missing or None."""
        if name not in row:
            raise BadRowError(name, f"missing; the row has columns {sorted(row)}", fix=fix)
        value = row[name]
        if value is None:
            raise BadRowError(name, "is None", fix=fix)
        return value

    @classmethod
    def text(cls, row: dict[str, Any], name: str, allow_empty: bool = False, fix: str | None = None) -> str:
        """``row[name]`` as a string, or :class:`BadRowError` (missing, not text, or empty)."""
        value = cls.column(row, name, fix=fix)
        if not isinstance(value, str):
            raise BadRowError(name, f"expected text, got {type(value).__name__} {value!r:.60}", fix=fix)
        if not allow_empty and not value.strip():
            raise BadRowError(name, "is empty", fix=fix)
        return value

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Filter:
    """Decides which rows to keep: ``filter(row: dict) -> bool`` (``True`` keeps the row).

    Subclass and implement :meth:`__call__`; a plain function with the same signature
    works wherever a Filter does (``dataset.filter(lambda row: row['length'] < 512)``).
    ``Dataset.filter`` counts and logs the rows a filter drops.
    """

    def __call__(self, row: dict[str, Any]) -> bool:
        """True to keep ``row``."""
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def as_list(value: Any) -> list[Any]:
    """``value`` as a list (a tuple or other iterable becomes a list; a scalar a one-item list)."""
    if isinstance(value, list):
        return value
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        return [value]
    return list(value)
