"""Where a model or data set id lives on disk: local paths, ``ms://`` and ``hf://`` ids.

* a local path (file or directory) is used as it is, and never reaches a hub: ModelScope's
  ``snapshot_download`` would treat it as a hub id and hang;
* ``ms://org/name`` downloads (or reuses the cached copy of) a ModelScope repository
  with ``modelscope.snapshot_download`` / ``modelscope.dataset_snapshot_download``;
* ``hf://org/name`` does the same with ``huggingface_hub.snapshot_download``;
* a bare ``org/name`` that is not a local path is looked up on ModelScope, as ms-swift does.

The hub libraries are imported only when a hub id is resolved (``pip install
'twinkle-core[hub]'``).

Example::

    from twinkle.hub import resolve_model_dir
    resolve_model_dir("ms://Qwen/Qwen2.5-0.5B-Instruct")  # '/root/.cache/modelscope/.../Qwen2.5-0.5B-Instruct'
    resolve_model_dir("./my-model")                     # './my-model'
"""

from __future__ import annotations

import os
from typing import Any

MS_PREFIX = "ms://"
HF_PREFIX = "hf://"


class HubError(ValueError):
    """An id that is neither a local path nor a valid hub id, or a missing hub library."""


def split_hub_id(model_id: str) -> tuple[str | None, str]:
    """``'ms://org/name'`` -> ``('ms', 'org/name')``; a local path -> ``(None, path)``.

    Raises:
        HubError: an empty id, or a hub id that is not ``org/name``.
    """
    if not isinstance(model_id, (str, os.PathLike)) or not str(model_id).strip():
        raise HubError(f"expected a local path, 'ms://org/name' or 'hf://org/name', got {model_id!r}")
    text = os.fspath(model_id)
    for hub, prefix in (("ms", MS_PREFIX), ("hf", HF_PREFIX)):
        if text.startswith(prefix):
            rest = text[len(prefix) :]
            if _local(rest) is not None:  # e.g. 'ms://Qwen/Qwen2.5-7B' already downloaded to ./Qwen/Qwen2.5-7B
                return hub, rest
            repo = rest.strip("/")
            if not _looks_like_repo(repo):
                raise HubError(
                    f"{text!r}: a {hub} id is '{prefix}org/name' (e.g. '{prefix}Qwen/Qwen2.5-0.5B-Instruct')"
                )
            return hub, repo
    return None, text


def _looks_like_repo(repo: str) -> bool:
    parts = repo.split("/")
    return len(parts) == 2 and all(parts) and not any(p in (".", "..") for p in parts)


def _local(text: str) -> str | None:
    path = os.path.expanduser(text)
    return path if os.path.exists(path) else None


def resolve_model_dir(model_id: str | os.PathLike, *, revision: str | None = None, **download_kwargs: Any) -> str:
    """A local directory holding the model ``model_id`` (config, tokenizer, weights).

    Args:
        model_id: a local directory, ``ms://org/name``, ``hf://org/name``, or a bare
            ``org/name`` (ModelScope).
        revision: a branch, tag or commit for hub ids.
        **download_kwargs: passed to the hub's ``snapshot_download`` (e.g.
            ``allow_patterns``, ``cache_dir``).

    Returns:
        The directory path.

    Raises:
        HubError: not a local path and not a hub id, or the hub library is missing.
        FileNotFoundError: a path that looks local (``./x``, ``/x``, ``~/x``) does not exist.

    Example::

        resolve_model_dir("hf://Qwen/Qwen2.5-0.5B-Instruct", revision="main")
    """
    return _resolve(model_id, "model", revision, download_kwargs)


def resolve_dataset_dir(dataset_id: str | os.PathLike, *, revision: str | None = None, **download_kwargs: Any) -> str:
    """A local path (file or directory) holding the data set ``dataset_id``; see :func:`resolve_model_dir`.

    Hub ids download the data set repository (``repo_type='dataset'``).
    """
    return _resolve(dataset_id, "dataset", revision, download_kwargs)


def _resolve(model_id: Any, repo_type: str, revision: str | None, download_kwargs: dict[str, Any]) -> str:
    hub, repo = split_hub_id(model_id)
    local = _local(repo)
    if local is not None:
        return local  # never hand a local path to a hub: modelscope hangs on it
    if hub is None:
        if repo.startswith((".", "/", "~")) or repo.count("/") != 1 or not _looks_like_repo(repo):
            raise FileNotFoundError(
                f"{repo!r} is not an existing local path. Pass an existing file or directory, or a hub id: "
                f"'ms://org/name' (ModelScope) or 'hf://org/name' (Hugging Face)."
            )
        hub = "ms"
    if hub == "ms":
        return _modelscope_download(repo, repo_type, revision, download_kwargs)
    return _huggingface_download(repo, repo_type, revision, download_kwargs)


def _modelscope_download(repo: str, repo_type: str, revision: str | None, kwargs: dict[str, Any]) -> str:
    try:
        import modelscope
    except ImportError:
        raise HubError(
            f"ms://{repo} needs the modelscope library: pip install 'twinkle-core[hub]' (or pip install modelscope)"
        ) from None
    if revision is not None:
        kwargs = {**kwargs, "revision": revision}
    if repo_type == "dataset":
        return modelscope.dataset_snapshot_download(repo, **kwargs)
    return modelscope.snapshot_download(repo, **kwargs)


def _huggingface_download(repo: str, repo_type: str, revision: str | None, kwargs: dict[str, Any]) -> str:
    try:
        import huggingface_hub
    except ImportError:
        raise HubError(
            f"hf://{repo} needs the huggingface_hub library: pip install 'twinkle-core[hub]' "
            f"(or pip install huggingface_hub)"
        ) from None
    if revision is not None:
        kwargs = {**kwargs, "revision": revision}
    if repo_type == "dataset":
        kwargs = {**kwargs, "repo_type": "dataset"}
    return huggingface_hub.snapshot_download(repo, **kwargs)
