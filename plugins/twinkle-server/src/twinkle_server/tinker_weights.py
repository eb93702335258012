"""Tinker external weights: ``save_weights_external``, signed download URLs, and the download route.

``TrainingClient.save_weights_external(name)`` writes the run's weights in Hugging Face format as
the checkpoint ``tinker://<run>/external_weights/<name>`` (listed, TTL'd and deleted like any
checkpoint). Its format is the server's ``ServerConfig.external_weights``: ``"adapter"`` (default,
what Tinker's export holds and the cookbook's ``weights.build_hf_model`` merges: PEFT's
``adapter_config.json`` + ``adapter_model.safetensors``) or ``"merged"`` (a full model directory,
written by core's :func:`twinkle.model.export.export_checkpoint`, which loads the base as this
server does, with its seed when the base has no weight files). With ``age_encryption_recipients``
every file is encrypted to them (``pyrage``) and stored with a ``.age`` suffix.

``RestClient.get_external_weights_urls(path)`` answers one URL per file, served by this server at
``/api/v1/external_weights/<tenant>/<run>/<name>/<file>?expires=<unix>&sig=<hex>``: ``sig`` is an
HMAC-SHA256, with a secret that only the server holds (``<state_dir>/url_signing.key``, created
0600), of the tenant, run, checkpoint, file and expiry, so a URL opens exactly one file of one
tenant's checkpoint until it expires (:data:`URL_TTL_S`, never past the checkpoint's own expiry),
needs no API key (``urllib`` fetches it, as the SDK's CLI and the cookbook do), and cannot be
bent to another file: the file must be a plain file listed in that checkpoint's directory (no
separators, no ``..``, no links). The URLs use the host the client called (``request.base_url``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from twinkle_server import checkpoints as ckpt
from twinkle_server.auth import current_state, current_tenant
from twinkle_server.state import ServerState
from twinkle_server.store import CheckpointRow, Tenant

router = APIRouter(prefix="/api/v1", tags=["tinker"])

KIND = "external"
#: how long a signed URL is valid (capped by the checkpoint's expiry)
URL_TTL_S = 3600
MAX_RECIPIENTS = 10
FORMATS = ("adapter", "merged")


class SaveWeightsExternalBody(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    model_id: str = Field(max_length=300)
    path: str = Field(max_length=300)
    seq_id: Optional[int] = Field(None, ge=0)
    ttl_seconds: Optional[int] = None
    age_encryption_recipients: Optional[list[str]] = None


# -- signing ---------------------------------------------------------------------------------
_SECRETS: dict[str, bytes] = {}


def signing_key(state_dir: Path) -> bytes:
    """The server's URL-signing secret (32 random bytes, created once, mode 0600)."""
    path = Path(state_dir) / "url_signing.key"
    cached = _SECRETS.get(str(path))
    if cached is not None:
        return cached
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
    else:
        key = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
    if len(key) < 32:
        raise RuntimeError(f"{path} holds no usable signing key; delete it to make a new one")
    _SECRETS[str(path)] = key
    return key


def signature(key: bytes, tenant_id: str, run_id: str, name: str, file: str, expires: int) -> str:
    """HMAC-SHA256 of one file of one checkpoint of one tenant until ``expires``."""
    message = "\n".join(("twinkle-external-weights-v1", tenant_id, run_id, name, file, str(expires)))
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


# -- export ----------------------------------------------------------------------------------
def _recipients(values: list[str]) -> list[Any]:
    if len(values) > MAX_RECIPIENTS:
        raise HTTPException(400, f"at most {MAX_RECIPIENTS} age_encryption_recipients, got {len(values)}")
    try:
        import pyrage
    except ImportError:
        raise HTTPException(
            400, "age_encryption_recipients need the pyrage package on the server (pip install pyrage)"
        ) from None
    out = []
    for value in values:
        try:
            if value.startswith("age1"):
                out.append(pyrage.x25519.Recipient.from_str(value))
            else:
                out.append(pyrage.ssh.Recipient.from_str(value))
        except Exception:
            raise HTTPException(
                400, f"age_encryption_recipients: {value[:40]!r} is not an age or SSH public key"
            ) from None
    return out


def export_run(state: ServerState, tenant: Tenant, run_id: str, directory: Path, fmt: str) -> None:
    """(Worker) write the run's weights into ``directory`` in Hugging Face format (``adapter`` or ``merged``)."""
    slot = state.loaded_slot(tenant, run_id)
    if fmt == "adapter":
        state.engine.save_slot(slot, directory, optimizer=False, base_model=state.config.model_name)
        return
    from twinkle.model.export import export_checkpoint

    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".adapter-") as adapter:
        state.engine.save_slot(slot, adapter, optimizer=False, base_model=state.config.model_name)
        export_checkpoint(
            str(state.config.model_dir), directory / "model", adapter=adapter, dtype="float32", seed=state.config.seed
        )
    for item in (directory / "model").iterdir():
        item.rename(directory / item.name)
    (directory / "model").rmdir()


def _encrypt(directory: Path, recipients: list[Any]) -> None:
    import pyrage

    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        (directory / f"{path.name}.age").write_bytes(pyrage.encrypt(path.read_bytes(), recipients))
        path.unlink()


@router.post("/save_weights_external")
def save_weights_external(
    body: SaveWeightsExternalBody, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """Export the run's weights as ``tinker://<run>/external_weights/<path>`` (in ``seq_id`` order)."""
    import json

    from twinkle_server.scheduler import UserError
    from twinkle_server.tinker_common import check_ttl, checkpoint_name, future_json, run_or_404

    run_or_404(state, tenant, body.model_id)
    try:
        name = checkpoint_name(body.path)
        check_ttl(body.ttl_seconds)
        recipients = _recipients(body.age_encryption_recipients) if body.age_encryption_recipients else None
    except (HTTPException, ValueError) as exc:
        if body.seq_id is None:
            raise
        # refused in its turn: the future fails with the reason and the client's later requests still run
        message = str(exc.detail if isinstance(exc, HTTPException) else exc)

        def refuse() -> tuple[str, bytes]:
            raise UserError(message)

        fid = state.submit(tenant, "save_weights_external", model_id=body.model_id, seq_id=body.seq_id, run=refuse)
        return future_json(fid, body.model_id)
    fmt = getattr(state.config, "external_weights", "adapter")
    if fmt not in FORMATS:
        raise HTTPException(500, f"ServerConfig.external_weights must be one of {FORMATS}")
    state.charge(tenant)

    def run() -> tuple[str, bytes]:
        dest = ckpt.checkpoint_dir(state.config.checkpoint_root, tenant.id, body.model_id, KIND, name)
        with ckpt.atomic_directory(dest) as tmp:
            export_run(state, tenant, body.model_id, tmp, fmt)
            if recipients:
                _encrypt(tmp, recipients)
            size = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
        now = time.time()
        meta = {"format": fmt, "encrypted": bool(recipients)}
        state.store.put_checkpoint(CheckpointRow(tenant.id, body.model_id, KIND, name, now, size, meta, False))
        expires = None if body.ttl_seconds is None else now + body.ttl_seconds
        state.store.set_checkpoint_expiry(tenant.id, body.model_id, KIND, name, expires)
        path = ckpt.TinkerPath(body.model_id, KIND, name)
        return "application/json", json.dumps(
            {"path": str(path), "size_bytes": size, "type": "save_weights_external"}
        ).encode()

    fid = state.submit(tenant, "save_weights_external", model_id=body.model_id, seq_id=body.seq_id, run=run)
    return future_json(fid, body.model_id)


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/external_weights_urls")
def external_weights_urls(
    run_id: str,
    checkpoint_id: str,
    request: Request,
    state: ServerState = Depends(current_state),
    tenant: Tenant = Depends(current_tenant),
) -> Any:
    """Signed, expiring download URLs for every file of an external weights checkpoint."""
    kind, name = ckpt.parse_checkpoint_id(checkpoint_id)
    if kind != KIND:
        raise HTTPException(400, f"{checkpoint_id!r} is not an external weights checkpoint (external_weights/<name>)")
    ckpt.check_run_id(run_id)
    state.expire_checkpoints()
    if state.store.checkpoint(tenant.id, run_id, KIND, name) is None:
        raise HTTPException(404, f"checkpoint {checkpoint_id} of {run_id} not found")
    directory = ckpt.checkpoint_dir(state.config.checkpoint_root, tenant.id, run_id, KIND, name)
    now = int(time.time())
    expires = now + URL_TTL_S
    ckpt_expiry = state.store.checkpoint_expiries(tenant.id).get((run_id, KIND, name))
    if ckpt_expiry is not None:
        expires = min(expires, int(ckpt_expiry))
    key = signing_key(state.config.state_dir)
    base = str(request.base_url).rstrip("/")
    urls = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.is_symlink() or path.name.startswith("."):
            continue
        sig = signature(key, tenant.id, run_id, name, path.name, expires)
        urls[path.name] = (
            f"{base}/api/v1/external_weights/{quote(tenant.id)}/{quote(run_id)}/{quote(name)}/{quote(path.name)}"
            f"?expires={expires}&sig={sig}"
        )
    return {"urls": urls, "expires": datetime.fromtimestamp(expires, tz=timezone.utc).isoformat()}


@router.get("/external_weights/{tenant_id}/{run_id}/{name}/{file}")
def download_external_weights(
    tenant_id: str,
    run_id: str,
    name: str,
    file: str,
    expires: int,
    sig: str,
    state: ServerState = Depends(current_state),
) -> Any:
    """One file of an external weights checkpoint, for a valid unexpired signature (no API key)."""
    forbidden = HTTPException(403, "this download URL is invalid or has expired; ask for new URLs")
    try:
        ckpt.check_run_id(tenant_id)
        ckpt.check_run_id(run_id)
        ckpt.check_name(name)
        ckpt.check_name(file, "file name")
    except ckpt.CheckpointPathError:
        raise forbidden from None
    expected = signature(signing_key(state.config.state_dir), tenant_id, run_id, name, file, expires)
    if not hmac.compare_digest(expected, sig) or expires < time.time():
        raise forbidden
    state.expire_checkpoints()
    if state.store.checkpoint(tenant_id, run_id, KIND, name) is None:
        raise HTTPException(404, "this checkpoint no longer exists")
    directory = ckpt.checkpoint_dir(state.config.checkpoint_root, tenant_id, run_id, KIND, name)
    path = directory / file
    if path.is_symlink() or not path.is_file() or path.resolve().parent != directory.resolve():
        raise HTTPException(404, "no such file in this checkpoint")
    return FileResponse(path, media_type="application/octet-stream", filename=file)
