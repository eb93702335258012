"""Dataset: rows on Hugging Face ``datasets`` (Arrow, cached, ``num_proc``) -> encoded features.

The data pipeline of one SFT run, in order::

    dataset = Dataset(dataset_meta=DatasetMeta("ms://swift/self-cognition", data_slice=range(1000)))
    dataset.set_template("Template", model_id="ms://Qwen/Qwen2.5-7B-Instruct")
    dataset.map(SelfCognitionProcessor("twinkle大模型", "ModelScope社区"))  # raw rows -> Trajectories
    dataset.encode()                                                      # + input_ids, labels, length
    dataset[0]["labels"]

A Dataset can hold several parts (``add_dataset``); ``map``/``filter``/``encode`` apply to
every part (or to one, ``dataset_meta=``), and ``mix_dataset`` interleaves or concatenates
them into one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

from twinkle.component import Component
from twinkle.dataset.meta import DatasetMeta
from twinkle.dispatch import remote

logger = logging.getLogger("twinkle.dataset")

MIX_STRATEGIES: tuple[str, ...] = ("interleave", "concat")
SAVE_FORMATS: tuple[str, ...] = ("arrow", "jsonl", "parquet")


def _short(key: str) -> str:
    """A part key for progress bars: the file name of a path."""
    return os.path.basename(key.rstrip("/")) if os.sep in key else key


def _rows_of(batch: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


def _columns_of(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    return {k: [row.get(k) for row in rows] for k in keys}


class _PreprocessFn:
    """A picklable batched ``datasets.map`` function around a Preprocessor."""

    def __init__(self, preprocessor: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
        self.preprocessor = preprocessor

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        from twinkle.preprocessor.base import BadRowError

        try:
            rows = self.preprocessor(_rows_of(batch))
        except BadRowError as exc:
            raise exc.at(indices[exc.index] if exc.index is not None else indices[0]) from None
        if rows is None or not isinstance(rows, list):
            raise TypeError(
                f"{self.preprocessor!r} returned {type(rows).__name__}; a preprocessor returns a list of rows"
            )
        return _columns_of(rows)


class _FilterFn:
    """A picklable ``datasets.filter`` function around a Filter, naming the row on errors."""

    def __init__(self, row_filter: Callable[[dict[str, Any]], bool]) -> None:
        self.row_filter = row_filter

    def __call__(self, row: dict[str, Any], index: int) -> bool:
        from twinkle.preprocessor.base import BadRowError

        try:
            return bool(self.row_filter(row))
        except BadRowError as exc:
            raise exc.at(index, type(self.row_filter).__name__) from None


class _EncodeFn:
    """A picklable batched ``datasets.map`` function around ``Template.encode_rows``."""

    def __init__(self, template: Any, add_generation_prompt: bool) -> None:
        self.template = template
        self.add_generation_prompt = add_generation_prompt

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        from twinkle.template.base import SequenceTooLongError, TemplateError

        rows = _rows_of(batch)
        try:
            features = self.template.encode_rows(rows, add_generation_prompt=self.add_generation_prompt)
        except TemplateError as exc:
            where = f"row {indices[exc.index]}" if exc.index is not None else f"rows {indices[0]}..{indices[-1]}"
            if isinstance(exc, SequenceTooLongError):
                raise SequenceTooLongError(f"{where}: {exc.detail}", exc.length, exc.max_length) from None
            raise TemplateError(f"{where}: {exc.detail}") from None
        kept: list[dict[str, Any]] = []
        for row, feature in zip(rows, features):
            if feature is not None:
                row.update(feature)
                kept.append(row)
        if not kept:
            return {k: [] for k in (*batch, "input_ids", "labels", "length")}
        return _columns_of(kept)


class DatasetBase(Component):
    """What :class:`Dataset` and :class:`~twinkle.dataset.IterableDataset` share: parts, map, filter, encode, mix."""

    #: load parts as streaming ``datasets.IterableDataset`` s.
    streaming = False

    def __init__(
        self,
        dataset_meta: DatasetMeta | str | None = None,
        *,
        num_proc: int | None = None,
        remote_group: str | None = None,
        device_mesh: Any = None,
    ) -> None:
        self.remote_group = remote_group
        self.device_mesh = device_mesh
        self.num_proc = num_proc
        self.template: Any = None
        #: part key -> ``datasets.Dataset`` (or ``IterableDataset``), in the order added.
        self.parts: dict[str, Any] = {}
        if dataset_meta is not None:
            self.add_dataset(dataset_meta)

    # -- parts ---------------------------------------------------------------------
    @remote()
    def add_dataset(self, dataset_meta: DatasetMeta | str) -> str:
        """Load another data set as a new part; ``mix_dataset`` later combines the parts.

        Args:
            dataset_meta: a :class:`DatasetMeta` or an id/path string.

        Returns:
            The part's key (``dataset_meta.key``), usable as ``dataset_meta=`` of
            ``map``/``filter``/``encode``.

        Raises:
            ValueError: a part with the same key exists already.
        """
        from twinkle.dataset.loading import load_part

        meta = dataset_meta if isinstance(dataset_meta, DatasetMeta) else DatasetMeta(dataset_meta)
        if meta.key in self.parts:
            raise ValueError(f"a part {meta.key!r} is already loaded; give a different split/subset or id")
        self.parts[meta.key] = load_part(meta, streaming=self.streaming, num_proc=self.num_proc)
        return meta.key

    def _selected(self, dataset_meta: DatasetMeta | str | None) -> list[str]:
        if not self.parts:
            raise ValueError(f"{type(self).__name__} has no data: pass dataset_meta= or call add_dataset() first")
        if dataset_meta is None:
            return list(self.parts)
        key = dataset_meta.key if isinstance(dataset_meta, DatasetMeta) else str(dataset_meta)
        if key not in self.parts:
            raise KeyError(f"no part {key!r}; parts: {list(self.parts)}")
        return [key]

    @property
    def dataset(self) -> Any:
        """The single ``datasets`` object behind this Dataset.

        Raises:
            ValueError: several parts are loaded and not mixed yet.
        """
        if len(self.parts) != 1:
            if not self.parts:
                raise ValueError(f"{type(self).__name__} has no data: pass dataset_meta= or call add_dataset()")
            raise ValueError(
                f"{type(self).__name__} holds {len(self.parts)} parts {list(self.parts)}; combine them with "
                f"mix_dataset('interleave') or mix_dataset('concat') first"
            )
        return next(iter(self.parts.values()))

    def _column_names(self, part: Any) -> list[str]:
        names = part.column_names
        if names is None:  # a streaming set whose features are not known yet
            first = next(iter(part.take(1)), None)
            names = list(first) if first is not None else []
        return list(names)

    def _map_kwargs(self, desc: str, num_proc: int | None, load_from_cache_file: bool | None) -> dict[str, Any]:
        if self.streaming:
            return {}
        kwargs: dict[str, Any] = {"desc": desc, "num_proc": num_proc or self.num_proc}
        if load_from_cache_file is not None:
            kwargs["load_from_cache_file"] = load_from_cache_file
        return kwargs

    def _map(self, part: Any, fn: Any, **kwargs: Any) -> Any:
        """``part.map(fn, **kwargs)``; datasets' own bar (rate, ETA) draws only on a terminal."""
        from twinkle.progress import library_bars

        with library_bars():
            return part.map(fn, **kwargs)

    def _count(self, part: Any) -> int | None:
        return None if self.streaming else len(part)

    # -- preprocess / filter ----------------------------------------------------------
    @remote()
    def map(
        self,
        preprocessor: Any,
        dataset_meta: DatasetMeta | str | None = None,
        *,
        num_proc: int | None = None,
        batch_size: int = 1000,
        load_from_cache_file: bool | None = None,
        **init_kwargs: Any,
    ) -> DatasetBase:
        """Turn raw rows into Trajectories with a Preprocessor (batched).

        Args:
            preprocessor: a Preprocessor instance, a registered name
                (``'AlpacaProcessor'``), a Preprocessor class, or a function
                ``rows: list[dict] -> list[dict]``.
            dataset_meta: only this part (default: every part).
            num_proc: worker processes (``datasets.map``).
            batch_size: rows per call.
            load_from_cache_file: reuse ``datasets``' cached result (default: its setting).
            **init_kwargs: arguments to construct ``preprocessor`` when it is a name or class.

        Returns:
            ``self``, for chaining.

        Raises:
            BadRowError: a bad row (its index and field in the message).
            ComponentNotFoundError: an unknown name (the message lists the registered ones).

        Example::

            dataset.map("AlpacaProcessor", system="You are terse.")
        """
        fn = self._resolve("preprocessor", preprocessor, init_kwargs)
        name = getattr(fn, "__name__", None) or type(fn).__name__
        for key in self._selected(dataset_meta):
            part = self.parts[key]
            before = self._count(part)
            part = self._map(
                part,
                _PreprocessFn(fn),
                batched=True,
                batch_size=batch_size,
                with_indices=True,
                remove_columns=self._column_names(part),
                **self._map_kwargs(f"{name} ({_short(key)})", num_proc, load_from_cache_file),
            )
            self.parts[key] = part
            self._log_drop(name, key, before, self._count(part))
        return self

    @remote()
    def filter(
        self,
        row_filter: Any,
        dataset_meta: DatasetMeta | str | None = None,
        *,
        num_proc: int | None = None,
        load_from_cache_file: bool | None = None,
        **init_kwargs: Any,
    ) -> DatasetBase:
        """Keep the rows ``row_filter(row)`` is true for; logs how many it dropped.

        Args:
            row_filter: a Filter instance, a registered name (``'LengthFilter'``), a
                Filter class, or a function ``row -> bool``.
            dataset_meta: only this part (default: every part).
            num_proc, load_from_cache_file: as in :meth:`map`.
            **init_kwargs: arguments to construct ``row_filter`` from a name or class.

        Returns:
            ``self``.

        Example::

            dataset.filter("LengthFilter", max_length=512)
        """
        fn = self._resolve("filter", row_filter, init_kwargs)
        name = getattr(fn, "__name__", None) or type(fn).__name__
        for key in self._selected(dataset_meta):
            part = self.parts[key]
            before = self._count(part)
            part = part.filter(
                _FilterFn(fn),
                with_indices=True,
                **self._map_kwargs(f"{name} ({_short(key)})", num_proc, load_from_cache_file),
            )
            self.parts[key] = part
            self._log_drop(name, key, before, self._count(part))
        return self

    def _resolve(self, kind: str, component: Any, init_kwargs: dict[str, Any]) -> Any:
        import inspect

        if isinstance(component, str):
            from twinkle.runtime import get_registry

            component = get_registry().resolve(kind, component)
        if inspect.isclass(component):
            return component(**init_kwargs)
        if init_kwargs:
            raise TypeError(
                f"keyword arguments {sorted(init_kwargs)} construct a {kind} from its name or class; "
                f"{component!r} is already built"
            )
        if not callable(component):
            raise TypeError(f"expected a {kind} (object, name, class or function), got {component!r}")
        return component

    @staticmethod
    def _log_drop(name: str, key: str, before: int | None, after: int | None) -> None:
        if before is not None and after is not None and after < before:
            logger.warning("%s dropped %d of %d rows of %s", name, before - after, before, key)

    # -- template / encode ----------------------------------------------------------------
    @remote()
    def set_template(self, template: Any = "Template", **kwargs: Any) -> Any:
        """Choose the Template that :meth:`encode` uses.

        Args:
            template: a registered name (``'Template'``), a Template class, or an instance.
            **kwargs: constructor arguments (``model_id=``, ``max_length=``,
                ``truncation_strategy=``, ``default_system=``).

        Returns:
            The Template.

        Example::

            dataset.set_template("Template", model_id="ms://Qwen/Qwen2.5-7B-Instruct", max_length=2048)
        """
        import inspect

        if isinstance(template, str):
            from twinkle.runtime import get_registry

            template = get_registry().resolve("template", template)
        if inspect.isclass(template):
            template = template(**kwargs)
        elif kwargs:
            raise TypeError(f"keyword arguments {sorted(kwargs)} construct a Template; {template!r} is already built")
        self.template = template
        return template

    @remote()
    def encode(
        self,
        dataset_meta: DatasetMeta | str | None = None,
        *,
        num_proc: int | None = None,
        batch_size: int = 1000,
        add_generation_prompt: bool = False,
        load_from_cache_file: bool | None = None,
    ) -> DatasetBase:
        """Tokenize every Trajectory with the Template; rows gain ``input_ids``, ``labels``, ``length``.

        Other columns (``messages``, ``user_data``...) stay. With
        ``truncation_strategy='delete'`` too-long rows are dropped and counted. Shows a
        progress bar.

        Args:
            dataset_meta: only this part (default: every part).
            num_proc: worker processes.
            batch_size: rows per ``Template.batch_encode`` call.
            add_generation_prompt: encode prompts for sampling (no labels).
            load_from_cache_file: reuse ``datasets``' cached result.

        Returns:
            ``self``.

        Raises:
            ValueError: no Template (call :meth:`set_template`).
            TemplateError: a row that cannot be encoded (its index in the message).
        """
        if self.template is None:
            raise ValueError("no template: call dataset.set_template('Template', model_id=...) before encode()")
        _ = self.template.tokenizer  # load it (and fail early) in this process
        fn = _EncodeFn(self.template, add_generation_prompt)
        for key in self._selected(dataset_meta):
            part = self.parts[key]
            before = self._count(part)
            part = self._map(
                part,
                fn,
                batched=True,
                batch_size=batch_size,
                with_indices=True,
                **self._map_kwargs(f"Encoding {_short(key)}", num_proc, load_from_cache_file),
            )
            self.parts[key] = part
            self._log_drop(f"encode (max_length={self.template.max_length}, delete)", key, before, self._count(part))
        return self

    # -- mixing ---------------------------------------------------------------------------
    @remote()
    def mix_dataset(
        self,
        strategy: str = "interleave",
        probabilities: list[float] | None = None,
        seed: int | None = None,
        stopping_strategy: str = "first_exhausted",
    ) -> DatasetBase:
        """Combine the parts into one.

        Args:
            strategy: ``'interleave'`` (alternate rows, or sample by ``probabilities``) or
                ``'concat'`` (one after another).
            probabilities: sampling weights per part for ``'interleave'``.
            seed: the sampling seed for ``probabilities``.
            stopping_strategy: ``'first_exhausted'`` or ``'all_exhausted'`` (oversample the
                shorter parts) for ``'interleave'``.

        Returns:
            ``self`` (now with one part named ``'mixed'``).

        Raises:
            ValueError: an unknown strategy, or parts whose columns differ (map them to the
                same format first).

        Example::

            dataset.add_dataset(DatasetMeta("alpaca.jsonl"))
            dataset.map("AlpacaProcessor", dataset_meta="alpaca.jsonl")
            dataset.mix_dataset("concat")
        """
        import datasets

        if strategy not in MIX_STRATEGIES:
            raise ValueError(f"strategy={strategy!r} must be one of {MIX_STRATEGIES}")
        parts = list(self.parts.values())
        if len(parts) < 2:
            return self
        columns = [set(self._column_names(p)) for p in parts]
        if any(c != columns[0] for c in columns[1:]):
            described = {k: sorted(c) for k, c in zip(self.parts, columns)}
            raise ValueError(
                f"cannot mix parts with different columns: {described}; map every part to the same format "
                f"(e.g. Trajectories with a Preprocessor) first, and encode all or none"
            )
        try:
            if strategy == "concat":
                mixed = datasets.concatenate_datasets(parts)
            else:
                mixed = datasets.interleave_datasets(
                    parts, probabilities=probabilities, seed=seed, stopping_strategy=stopping_strategy
                )
        except ValueError as exc:
            raise ValueError(
                f"cannot mix parts {list(self.parts)}: {exc}. Their column types differ; map them to the same format"
            ) from exc
        self.parts = {"mixed": mixed}
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(parts={list(self.parts)}, template={self.template!r})"


class Dataset(DatasetBase):
    """An Arrow-backed, cached data set: load, preprocess, filter, encode, mix, save.

    Args:
        dataset_meta: what to load (a :class:`DatasetMeta` or an id/path); more parts
            with :meth:`add_dataset`.
        num_proc: default worker processes for ``map``/``filter``/``encode``.
        remote_group: the DeviceGroup to place it on (ray/http modes).
        device_mesh: stored for launchers.

    Example::

        dataset = Dataset(dataset_meta=DatasetMeta(str(assets.path("datasets/alpaca_tiny.jsonl"))))
        dataset.set_template("Template", model_id=str(assets.path("tiny-qwen2")))
        dataset.map("AlpacaProcessor").encode()
        len(dataset), dataset[0]["input_ids"][:5]
    """

    @remote()
    def __len__(self) -> int:
        """Number of rows (of the single, or mixed, part)."""
        return len(self.dataset)

    @remote()
    def __getitem__(self, index: int) -> dict[str, Any]:
        """Row ``index`` as a dict."""
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"dataset indices are integers, got {index!r}")
        n = len(self.dataset)
        if not -n <= index < n:
            raise IndexError(f"row {index} is out of range for {n} rows")
        return self.dataset[index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.dataset)

    @property
    def column_names(self) -> list[str]:
        """The columns of the single (or mixed) part."""
        return list(self.dataset.column_names)

    @remote()
    def save(self, path: str | os.PathLike, format: str | None = None, overwrite: bool = False) -> str:
        """Save the processed rows, atomically (written to a temp path, then renamed).

        Args:
            path: a directory (``'arrow'``, reloadable with ``DatasetMeta(path)``), or a
                ``.jsonl`` / ``.parquet`` file.
            format: ``'arrow'``, ``'jsonl'`` or ``'parquet'``; default: from the suffix.
            overwrite: replace an existing path.

        Returns:
            The path written.

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is False.
            ValueError: an unknown format.

        Example::

            dataset.save("out/encoded")            # later: Dataset(DatasetMeta("out/encoded"))
        """
        path = os.fspath(path)
        if format is None:
            suffix = os.path.splitext(path)[1].lower()
            format = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(suffix, "arrow")
        if format not in SAVE_FORMATS:
            raise ValueError(f"format={format!r} must be one of {SAVE_FORMATS}")
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it or choose another path")
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
        try:
            if format == "arrow":
                target = os.path.join(tmp, "data")
                self.dataset.save_to_disk(target)
            else:
                target = os.path.join(tmp, "data")
                if format == "jsonl":
                    self.dataset.to_json(target, force_ascii=False, lines=True)
                else:
                    self.dataset.to_parquet(target)
            if os.path.exists(path):
                old = path + ".old"
                os.replace(path, old) if os.path.isfile(path) else os.rename(path, old)
                os.rename(target, path)
                shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
            else:
                os.rename(target, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path
