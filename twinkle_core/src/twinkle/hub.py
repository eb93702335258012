"""Where a model or data set id lives on disk: local paths, ``ms://`` and ``hf://`` ids.

* a local path (file or directory) is used as it is, and never reaches a hub: ModelScope's
  ``snapshot_download`` would treat it as a hub id and hang;
* ``ms://org/name`` downloads (or reuses the cached copy of) a ModelScope repository
  with ``modelscope.snapshot_download`` / ``modelscope.dataset_snapshot_download``;
* ``hf://org/name`` does the same with ``huggingface_hub.snapshot_download``;
* a bare ``org/name`` that is not a local path is looked up on ModelScope, as ms-swift does.

The hub libraries are imported only when a hub id is resolved (``pip install
'twinkle-core[hub]'``); without them, a hub id raises :class:`HubError` naming that command.
A hub id that is neither cached nor reachable (no network, ``HF_HUB_OFFLINE=1``) raises
:class:`HubOfflineError` saying so and how to get the files, not the hub library's own error.

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


class HubOfflineError(HubError, ConnectionError):
    """A hub id that is not in the local cache, while the hub cannot be reached."""

    #: The hub library's own exception.
    original: BaseException | None = None


#: Exception class names (of huggingface_hub, modelscope, requests, httpx) that mean "no network
#: and no cached copy"; matched by name so that no hub library is imported to check.
_OFFLINE_ERRORS = (
    "LocalEntryNotFoundError",
    "OfflineModeIsEnabled",
    "ConnectionError",
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "Timeout",
    "TimeoutException",
    "NewConnectionError",
    "MaxRetryError",
    "NameResolutionError",
)


def _is_offline_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & set(_OFFLINE_ERRORS)) or isinstance(exc, (ConnectionError, TimeoutError))


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
        HubError: not a local path and not a hub id, or the hub library is missing (the
            message names the install command).
        HubOfflineError: a hub id that is not cached while the hub cannot be reached.
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
        if repo.startswith((".", "/", "~")) or not _looks_like_repo(repo):
            raise FileNotFoundError(
                f"{repo!r} is not an existing local path. Pass an existing file or directory, or a hub id: "
                f"'ms://org/name' (ModelScope) or 'hf://org/name' (Hugging Face)."
            )
        hub = "ms"
    download = _modelscope_download if hub == "ms" else _huggingface_download
    from twinkle.progress import library_bars

    try:
        # huggingface_hub's download bars (rate, ETA) on a terminal only
        with library_bars(libraries=("huggingface_hub.utils",), import_missing=True):
            return download(repo, repo_type, revision, download_kwargs)
    except HubError:
        raise
    except Exception as exc:
        if not _is_offline_error(exc):
            raise
        error = HubOfflineError(_offline_message(hub, repo, repo_type, exc))
        error.original = exc  # the hub library's own exception, without its traceback in the user's face
    raise error from None


def _offline_message(hub: str, repo: str, repo_type: str, exc: BaseException) -> str:
    detail = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else "no detail"
    if hub == "hf":
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
        kind = " --repo-type dataset" if repo_type == "dataset" else ""
        fetch = f"`hf download {repo}{kind}` on a machine with network (same HF_HOME)"
    else:
        why = "ModelScope cannot be reached"
        kind = " --dataset" if repo_type == "dataset" else " --model"
        fetch = f"`modelscope download{kind} {repo}` on a machine with network (same MODELSCOPE_CACHE)"
    return (
        f"{hub}://{repo} is not in the local cache and {why} ({type(exc).__name__}: {detail}). "
        f"Download it first with {fetch}, or pass the local directory that holds it."
    )


def _missing_hub_library(hub_id: str, library: str) -> HubError:
    from twinkle._kinds import extra_hint

    return HubError(
        f"{hub_id} needs the {library} library, from twinkle-core's 'hub' extra, which is not installed. "
        f"Install it: {extra_hint('hub')} Or pass a local directory."
    )


def _modelscope_download(repo: str, repo_type: str, revision: str | None, kwargs: dict[str, Any]) -> str:
    try:
        import modelscope
    except ImportError:
        raise _missing_hub_library(f"ms://{repo}", "modelscope") from None
    if revision is not None:
        kwargs = {**kwargs, "revision": revision}
    if repo_type == "dataset":
        return modelscope.dataset_snapshot_download(repo, **kwargs)
    return modelscope.snapshot_download(repo, **kwargs)


def _huggingface_download(repo: str, repo_type: str, revision: str | None, kwargs: dict[str, Any]) -> str:
    try:
        import huggingface_hub
    except ImportError:
        raise _missing_hub_library(f"hf://{repo}", "huggingface_hub") from None
    if revision is not None:
        kwargs = {**kwargs, "revision": revision}
    if repo_type == "dataset":
        kwargs = {**kwargs, "repo_type": "dataset"}
    return huggingface_hub.snapshot_download(repo, **kwargs)
