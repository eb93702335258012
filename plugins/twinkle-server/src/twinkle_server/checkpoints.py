"""Checkpoint names, ``tinker://`` paths and atomic directory writes.

A checkpoint lives at ``<root>/<tenant id>/<run id>/<kind>/<name>/``. Every component of
that path comes from the database or passes :func:`check_name`, so no user string is ever
joined into a filesystem path unchecked (no ``..``, no separators, no absolute paths).

Writes go to a private temporary directory next to the destination and are renamed into
place, so a crash leaves either the old checkpoint or the new one, never half of one.
:func:`recover` (run at server start) removes abandoned temporary directories and puts
back a checkpoint whose replacement was interrupted between its two renames.

Example::

    with atomic_directory(dest) as tmp:
        (tmp / "weights.bin").write_bytes(data)
    # dest now holds weights.bin
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

#: tinker path segment -> checkpoint kind.
SEGMENT_KIND = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
KIND_SEGMENT = {v: k for k, v in SEGMENT_KIND.items()}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RUN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._-]{0,199}$")


class CheckpointPathError(ValueError):
    """A checkpoint name or ``tinker://`` path that is malformed or unsafe."""


def check_name(name: str, what: str = "checkpoint name") -> str:
    """Return ``name`` if it is a safe single path component, else raise.

    Raises:
        CheckpointPathError: empty, too long, a separator, ``..`` or another unsafe character.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise CheckpointPathError(
            f"{what} {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', no '..')"
        )
    return name


@dataclass(frozen=True)
class TinkerPath:
    """A parsed ``tinker://<run id>/<weights|sampler_weights>/<name>`` path."""

    run_id: str
    kind: str
    name: str

    def __str__(self) -> str:
        return f"tinker://{self.run_id}/{KIND_SEGMENT[self.kind]}/{self.name}"

    @property
    def checkpoint_id(self) -> str:
        """The id the REST API uses: ``weights/<name>`` or ``sampler_weights/<name>``."""
        return f"{KIND_SEGMENT[self.kind]}/{self.name}"


def parse_tinker_path(path: str) -> TinkerPath:
    """Parse and validate a ``tinker://`` checkpoint path.

    Raises:
        CheckpointPathError: not a ``tinker://run/weights/name`` (or ``sampler_weights``) path,
            or a component is unsafe.
    """
    if not isinstance(path, str) or not path.startswith("tinker://"):
        raise CheckpointPathError(f"{path!r} is not a checkpoint path; expected tinker://<run id>/weights/<name>")
    parts = path[len("tinker://") :].split("/")
    if len(parts) != 3 or parts[1] not in SEGMENT_KIND:
        raise CheckpointPathError(
            f"{path!r} is not a checkpoint path; expected tinker://<run id>/weights/<name> "
            "or tinker://<run id>/sampler_weights/<name>"
        )
    return TinkerPath(check_run_id(parts[0]), SEGMENT_KIND[parts[1]], check_name(parts[2]))


def parse_checkpoint_id(checkpoint_id: str) -> tuple[str, str]:
    """``weights/<name>`` -> ``("training", name)``.

    Raises:
        CheckpointPathError: malformed or unsafe.
    """
    segment, _, name = checkpoint_id.partition("/")
    if segment not in SEGMENT_KIND:
        raise CheckpointPathError(
            f"checkpoint id {checkpoint_id!r} must look like weights/<name>, sampler_weights/<name> "
            "or external_weights/<name>"
        )
    return SEGMENT_KIND[segment], check_name(name)


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is a safe path component, else raise :class:`CheckpointPathError`."""
    if not isinstance(run_id, str) or not _RUN.fullmatch(run_id) or ".." in run_id:
        raise CheckpointPathError(f"training run id {run_id!r} is malformed")
    return run_id


def checkpoint_dir(root: Path, tenant_id: str, run_id: str, kind: str, name: str) -> Path:
    """Where a checkpoint's files live (every component validated)."""
    path = root / check_run_id(tenant_id) / check_run_id(run_id) / kind / check_name(name)
    resolved_root = root.resolve()
    if resolved_root not in path.resolve().parents:
        raise CheckpointPathError("checkpoint path escapes the checkpoint root")
    return path


@contextlib.contextmanager
def atomic_directory(dest: Path) -> Iterator[Path]:
    """Yield a private temporary directory; on success it replaces ``dest`` atomically.

    On an exception the temporary directory is removed and ``dest`` is untouched.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(6)
    tmp = dest.parent / f".tmp-{dest.name}-{token}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        if dest.exists():
            trash = dest.parent / f".old-{dest.name}-{token}"
            os.rename(dest, trash)
            os.rename(tmp, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_directory(path: Path) -> None:
    """Delete a checkpoint directory: rename it away first, so it vanishes atomically."""
    if not path.exists():
        return
    trash = path.parent / f".del-{path.name}-{secrets.token_hex(6)}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def recover(root: Path) -> None:
    """Clean up after a crash: drop temporary/deleted dirs, restore interrupted replacements."""
    if not root.exists():
        return
    for path in sorted(root.rglob(".*-*")):
        if not path.is_dir():
            continue
        if path.name.startswith(".old-"):
            name = path.name[len(".old-") : path.name.rfind("-")]
            dest = path.parent / name
            if dest.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, dest)
        elif path.name.startswith((".tmp-", ".del-")):
            shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
