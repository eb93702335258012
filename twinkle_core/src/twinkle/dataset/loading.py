"""Load a :class:`DatasetMeta` into a Hugging Face ``datasets`` object (Arrow-backed, cached)."""

from __future__ import annotations

import os
from typing import Any

from twinkle.dataset.meta import DatasetMeta

#: file suffix -> ``datasets`` builder.
FILE_BUILDERS: dict[str, str] = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".arrow": "arrow",
}


def _builder_for(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    builder = FILE_BUILDERS.get(suffix)
    if builder is None:
        raise ValueError(
            f"cannot load {path!r}: unknown file type {suffix!r}; use one of {', '.join(sorted(FILE_BUILDERS))}, "
            f"a directory, or an 'ms://' / 'hf://' id"
        )
    return builder


def _is_saved_dataset(path: str) -> bool:
    names = set(os.listdir(path))
    return "state.json" in names or "dataset_dict.json" in names


def load_part(meta: DatasetMeta, streaming: bool = False, num_proc: int | None = None) -> Any:
    """The rows ``meta`` names, as a ``datasets.Dataset`` (or ``IterableDataset`` when streaming).

    Raises:
        FileNotFoundError, HubError: the id is neither a local path nor a hub id.
        ValueError: an unknown file type, a missing split, or a bad ``data_slice``.
    """
    import datasets

    from twinkle.hub import resolve_dataset_dir

    if meta.rows is not None:
        part = datasets.Dataset.from_list(list(meta.rows))
        if streaming:
            part = part.to_iterable_dataset()
        return _apply_slice(part, meta, streaming)
    path = resolve_dataset_dir(meta.dataset_id, revision=meta.revision)
    if os.path.isfile(path):
        if meta.split != "train":
            raise ValueError(f"{meta.key}: a single file only has the 'train' split, not {meta.split!r}")
        builder = _builder_for(path)
        kwargs: dict[str, Any] = {"delimiter": "\t"} if path.lower().endswith(".tsv") else {}
        part = datasets.load_dataset(builder, data_files=path, split="train", streaming=streaming, **kwargs)
    elif _is_saved_dataset(path):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if meta.split not in loaded:
                raise ValueError(f"{meta.key}: no split {meta.split!r}; the saved set has {list(loaded)}")
            loaded = loaded[meta.split]
        part = loaded.to_iterable_dataset() if streaming else loaded
    else:
        try:
            part = datasets.load_dataset(
                path,
                name=meta.subset_name,
                split=meta.split,
                streaming=streaming,
                **({"num_proc": num_proc} if num_proc and not streaming else {}),
            )
        except ValueError as exc:
            raise ValueError(
                f"{meta.key}: cannot load {path!r} (subset {meta.subset_name!r}, split {meta.split!r}): {exc}"
            ) from exc
    return _apply_slice(part, meta, streaming)


def _apply_slice(part: Any, meta: DatasetMeta, streaming: bool) -> Any:
    if meta.data_slice is None:
        return part
    if streaming:
        selection = meta.data_slice
        if isinstance(selection, range) and selection.step == 1:
            return part.skip(selection.start).take(len(selection))
        if isinstance(selection, slice) and selection.step in (None, 1):
            start = selection.start or 0
            part = part.skip(start)
            return part.take(selection.stop - start) if selection.stop is not None else part
        raise ValueError(
            f"{meta.key}: a streaming data set can only take a contiguous data_slice (range(a, b) or slice(a, b)), "
            f"got {selection!r}"
        )
    indices = meta.indices(len(part))
    return part.select(indices)
