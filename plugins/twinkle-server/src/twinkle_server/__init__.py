"""``twinkle serve``: one base model, many tenants' LoRA adapters, over HTTP.

Install with ``pip install 'twinkle-core[http]'``. Modules (each one job):

* :mod:`~twinkle_server.config`: :class:`ServerConfig`.
* :mod:`~twinkle_server.store`: SQLite state (tenants, hashed API keys, sessions, runs,
  checkpoints, futures).
* :mod:`~twinkle_server.engine`: the one engine: a core ``TransformersModel`` whose named
  adapters are the tenants (both APIs); batched multi-adapter passes, per-adapter AdamW,
  adapter save/load.
* :mod:`~twinkle_server.tinker_rows`: Tinker datums as core rows, their checks and outputs.
* :mod:`~twinkle_server.sampling`: KV-cache generation and prompt top-k on the shared model.
* :mod:`~twinkle_server.losses`: the Tinker losses (core's).
* :mod:`~twinkle_server.scheduler`: per-run ``seq_id`` ordering and cross-tenant batching.
* :mod:`~twinkle_server.state`: :class:`ServerState`, the operations both APIs share;
  :mod:`~twinkle_server.quotas`: a tenant's limits, its request rate, :class:`QuotaExceeded`.
* :mod:`~twinkle_server.checkpoints`: safe names, ``tinker://`` paths, atomic writes.
* :mod:`~twinkle_server.wire`: the Tinker protobuf wire format.
* :mod:`~twinkle_server.tinker_api` / :mod:`~twinkle_server.twinkle_api`: the two HTTP APIs.
* :mod:`~twinkle_server.tinker_runs`: the Tinker API's runs and checkpoints (list, delete, TTL);
  :mod:`~twinkle_server.tinker_sampling`: its sampling sessions and ``asample``;
  :mod:`~twinkle_server.tinker_common`: helpers every Tinker router shares.
* :mod:`~twinkle_server.twinkle_host`: the twinkle API's hosted objects (models, samplers,
  checkpoint engines) and how their calls run.
* :mod:`~twinkle_server.app`: the FastAPI app (limits, errors); :mod:`~twinkle_server.cli`:
  ``twinkle serve``.

Example::

    twinkle serve --state-dir ./state --add-tenant alice   # prints alice's API key
    twinkle serve --state-dir ./state --port 8000
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "ServerConfig": "twinkle_server.config:ServerConfig",
    "create_app": "twinkle_server.app:create_app",
    "Store": "twinkle_server.store:Store",
    "LoRAEngine": "twinkle_server.engine:LoRAEngine",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'twinkle_server' has no attribute {name!r}")
    from twinkle._utils import import_target

    return import_target(target)
