"""``twinkle serve``: run the multi-tenant LoRA training server, or add a tenant.

twinkle serve --state-dir ./twinkle-state                       # tiny model, 127.0.0.1:8000
twinkle serve --state-dir ./twinkle-state --add-tenant alice     # prints alice's API key
twinkle serve --model /models/Qwen2.5-0.5B --model-name Qwen/Qwen2.5-0.5B --max-adapters 16
twinkle serve --state-dir ./twinkle-state --device cpu          # stay on the CPU on a GPU machine
twinkle serve --device-slots 8 --adapter-host-gb 64 --idle-unload-s 1800   # adapters paged, idle ones unloaded
twinkle serve --status --port 8000 --api-key tml-...            # a running server's adapter capacity
twinkle serve --sampler vllm --vllm-arg gpu_memory_utilization=0.3  # Tinker sampling on vLLM (twinkle-vllm)
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Give ``twinkle serve``'s parser its options (the target of the plugin's ``twinkle_register_commands``)."""
    p.add_argument(
        "--state-dir", default="./twinkle-state", help="SQLite state and checkpoints (default ./twinkle-state)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default 8000)")
    p.add_argument("--port-file", help="write the bound port here once listening")
    p.add_argument("--model", help="local Hugging Face model directory (default: the bundled tiny model)")
    p.add_argument("--model-name", help="base-model name clients use (default twinkle/tiny-qwen2)")
    p.add_argument("--seed", type=int, default=0, help="seed of random base weights when the model has none")
    p.add_argument(
        "--device",
        default="auto",
        help="where the base model and adapters live: auto (CUDA when available, else cpu), cpu, cuda, cuda:N",
    )
    p.add_argument(
        "--max-adapters", type=int, default=64, help="live LoRA adapters at most, on the device or paged (default 64)"
    )
    p.add_argument(
        "--device-slots",
        type=int,
        help="adapters resident on the device at once; the others are paged to host memory (default min(max, 8))",
    )
    p.add_argument(
        "--adapter-host-gb",
        type=float,
        help="host memory for live adapters and their optimizer state, GiB (default: a quarter of RAM)",
    )
    p.add_argument("--max-rank", type=int, default=64, help="largest LoRA rank")
    p.add_argument("--max-body-mb", type=float, default=32, help="largest request body in MiB")
    p.add_argument("--max-tokens-per-request", type=int, default=1_000_000, help="default per-tenant limit")
    p.add_argument("--max-adapters-per-tenant", type=int, default=4, help="default per-tenant loaded runs")
    p.add_argument("--requests-per-minute", type=int, default=6000, help="default per-tenant request rate")
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=250,
        help="longest a training pass waits for tenants between two steps (default 250, capped at half a pass)",
    )
    p.add_argument(
        "--run-idle-minutes",
        type=float,
        default=60,
        help="unload training runs no request touched for this long (0: never; default 60)",
    )
    p.add_argument(
        "--idle-unload-s",
        type=float,
        help="unload runs and objects no request touched for this many seconds; reloaded on use "
        "(overrides --run-idle-minutes; 0: never)",
    )
    p.add_argument(
        "--future-ttl-minutes", type=float, default=60, help="delete finished futures after this long (default 60)"
    )
    p.add_argument(
        "--api-docs", action="store_true", help="serve the OpenAPI schema at /openapi.json (behind an API key)"
    )
    p.add_argument(
        "--control-rpm",
        type=int,
        default=6000,
        help="per-tenant rate of non-compute requests (sessions, lists, retrieve_future); default 6000",
    )
    p.add_argument(
        "--sample-slice-ms",
        type=float,
        default=500,
        help="decoding time a sampling request runs before other tenants' work goes between (0: whole; default 500)",
    )
    p.add_argument(
        "--external-weights",
        default="adapter",
        choices=["adapter", "merged"],
        help="format of Tinker's save_weights_external: the PEFT adapter (default) or a merged full model",
    )
    p.add_argument(
        "--sampler",
        default="torch",
        choices=["torch", "vllm", "auto"],
        help="what serves Tinker sampling: torch (the training model's KV-cache generation; default), vllm "
        "(twinkle-vllm's VLLMSampler with its own copy of the base, tenants' adapters pushed on change), "
        "auto (vllm when twinkle-vllm is installed)",
    )
    p.add_argument("--vllm-max-loras", type=int, default=4, help="with --sampler vllm: adapters per vLLM batch")
    p.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --sampler vllm: a vllm.LLM argument (VALUE read as JSON when it parses), e.g. "
        "gpu_memory_utilization=0.3 (the default on a GPU), kv_cache_memory_bytes=1073741824 (the default on "
        "the CPU), max_num_seqs=64; repeatable",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads of the server (default: torch's choice)")
    p.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="uvicorn log level"
    )
    p.add_argument("--stats-file", help="write the batching statistics here as JSON when the server stops")
    p.add_argument(
        "--status",
        action="store_true",
        help="print the adapter capacity of the server at --host/--port (needs --api-key) and exit",
    )
    p.add_argument("--api-key", help="with --status: a tenant's API key (default: $TWINKLE_API_KEY)")
    p.add_argument("--add-tenant", metavar="NAME", help="create a tenant, print its API key and exit")
    p.add_argument("--tenant-max-adapters", type=int, help="with --add-tenant: this tenant's loaded-run limit")
    p.add_argument("--tenant-max-tokens", type=int, help="with --add-tenant: this tenant's tokens-per-request limit")
    p.add_argument("--tenant-rpm", type=int, help="with --add-tenant: this tenant's requests per minute")
    p.set_defaults(func=serve_main)


def _config(args: argparse.Namespace) -> Any:
    from twinkle_server.config import ServerConfig

    kwargs: dict[str, Any] = {}
    if args.model:
        kwargs["model_dir"] = Path(args.model).resolve()
    if args.model_name:
        kwargs["model_name"] = args.model_name
    return ServerConfig(
        state_dir=Path(args.state_dir).resolve(),
        seed=args.seed,
        device=args.device,
        max_adapters=args.max_adapters,
        device_slots=args.device_slots,
        adapter_host_bytes=int(args.adapter_host_gb * (1 << 30)) if args.adapter_host_gb is not None else None,
        max_rank=args.max_rank,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_tokens_per_request=args.max_tokens_per_request,
        max_adapters_per_tenant=args.max_adapters_per_tenant,
        requests_per_minute=args.requests_per_minute,
        batch_window_s=args.batch_window_ms / 1000,
        external_weights=args.external_weights,
        api_docs=args.api_docs,
        run_idle_s=args.idle_unload_s if args.idle_unload_s is not None else args.run_idle_minutes * 60,
        future_ttl_s=args.future_ttl_minutes * 60,
        control_requests_per_minute=args.control_rpm,
        sample_slice_s=args.sample_slice_ms / 1000,
        sampler=getattr(args, "sampler", "torch"),
        vllm_max_loras=getattr(args, "vllm_max_loras", 4),
        vllm_engine_args=_vllm_args(getattr(args, "vllm_arg", [])),
        stats_file=Path(args.stats_file).resolve() if args.stats_file else None,
        **kwargs,
    )


def _vllm_args(items: list[str]) -> dict[str, Any]:
    """``--vllm-arg KEY=VALUE`` options as ``vllm.LLM`` keyword arguments (values parsed as JSON when they parse)."""
    import json

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"error: --vllm-arg wants KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def format_capacity(cap: dict[str, Any]) -> str:
    """The lines ``twinkle serve --status`` prints for a capacity answer (``GET /api/v1/capacity``)."""
    lines = [
        f"device slots      {cap['resident']} of {cap['slots']} in use ({cap['free']} free)",
        f"paged to host     {cap['paged']} adapters",
        f"unloaded (idle)   {cap['unloaded']} adapters, reloaded on use",
        f"live adapters     {cap['live']} of {cap['max_adapters']}",
        f"host memory       {_mib(cap['host_bytes_used'])} of {_mib(cap['host_bytes_budget'])}",
        f"idle unload after {cap['idle_unload_s']:.0f} s" if cap.get("idle_unload_s") else "idle unload       off",
    ]
    tenant = cap.get("tenant")
    if tenant:
        lines.append(f"tenant {tenant['name']!r}   holds {tenant['held']} of {tenant['limit']} adapters")
    return "\n".join(lines)


def status_main(args: argparse.Namespace) -> int:
    """``twinkle serve --status``: ask a running server for its capacity and print it."""
    import json
    import os
    import urllib.error
    import urllib.request

    key = args.api_key or os.environ.get("TWINKLE_API_KEY")
    if not key:
        print("error: --status needs an API key: --api-key KEY or TWINKLE_API_KEY (twinkle serve --add-tenant NAME)")
        return 1
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{host}:{args.port}/api/v1/capacity"
    request = urllib.request.Request(url, headers={"X-API-Key": key})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            cap = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(f"error: {url} answered {exc.code}: {exc.read().decode(errors='replace')}")
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"error: no twinkle server at {url}: {exc}")
        return 1
    print(format_capacity(cap))
    return 0


def serve_main(args: argparse.Namespace) -> int:
    """Entry point of ``twinkle serve``."""
    if getattr(args, "status", False):
        return status_main(args)
    config = _config(args)
    if args.add_tenant:
        from twinkle_server.store import Store

        store = Store(config.database)
        try:
            _, key = store.create_tenant(
                args.add_tenant,
                max_adapters=args.tenant_max_adapters,
                max_tokens_per_request=args.tenant_max_tokens,
                requests_per_minute=args.tenant_rpm,
            )
        except ValueError as exc:
            print(f"error: {exc}")
            return 1
        finally:
            store.close()
        print(key)
        return 0
    try:
        import uvicorn

        from twinkle_server.app import create_app
    except ImportError as exc:
        print(f"error: twinkle serve needs {exc.name}, a dependency of twinkle-server: pip install twinkle-server")
        return 1

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from twinkle_server.engine import EngineError

    try:
        app = create_app(config)
    except (EngineError, ImportError) as exc:  # a bad --model or --device, or --sampler vllm without vLLM
        print(f"error: {exc}")
        return 1
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    if args.port_file:

        def write_port() -> None:
            while not server.started:
                time.sleep(0.05)
            port = server.servers[0].sockets[0].getsockname()[1]
            tmp = Path(args.port_file).with_suffix(".tmp")
            tmp.write_text(str(port))
            tmp.replace(args.port_file)

        threading.Thread(target=write_port, daemon=True).start()
    server.run()
    return 0
