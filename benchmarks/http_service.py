"""`twinkle serve` throughput: HTTP overhead per step, and 8 tenants against 1.

Two comparisons, each side by side in this one process (the server runs in a thread on
127.0.0.1, the clients are the official tinker SDK):

1. Overhead per training step (forward_backward + optim_step): the same LoRAEngine called
   in-process (what a user without the service would run) against the tinker SDK over HTTP.
2. Aggregate throughput: 1 tenant training on a batch of ``tenants x rows`` datums per step
   against ``tenants`` tenants each training on ``rows`` datums per step, concurrently
   (same total batch). The server batches the tenants' requests into multi-LoRA passes.
   Goal: the 8-tenant aggregate tokens/s at least 0.8x the single tenant's.

    python benchmarks/http_service.py                  # defaults: 8 tenants, 4 rows x 64 tokens
    python benchmarks/http_service.py --steps 20 --seq-len 128
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TINKER_TELEMETRY", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "http"))

BASE = "twinkle/tiny-qwen2"


def _datums(rows: int, seq_len: int, offset: int) -> list:
    import numpy as np
    from tinker import types

    out = []
    for r in range(rows):
        tokens = [(offset * 131 + r * 17 + i * 7) % 2900 + 5 for i in range(seq_len + 1)]
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": np.array(tokens[1:])},
            )
        )
    return out


def _engine_datums(datums: list) -> list:
    from twinkle.server.engine import Datum

    return [
        Datum(d.model_input.to_ints(), {"target_tokens": d.loss_fn_inputs["target_tokens"].to_numpy()}) for d in datums
    ]


def in_process_step_s(engine, rows: int, seq_len: int, steps: int) -> float:
    from twinkle.server.engine import BatchJob

    slot = engine.create_slot(8)
    data = _engine_datums(_datums(rows, seq_len, 0))
    try:
        for _ in range(3):
            engine.forward_backward([BatchJob(slot, data)])
            engine.optim_step(slot, learning_rate=1e-4)
        start = time.perf_counter()
        for _ in range(steps):
            engine.forward_backward([BatchJob(slot, data)])
            engine.optim_step(slot, learning_rate=1e-4)
        return (time.perf_counter() - start) / steps
    finally:
        engine.free_slot(slot)


def http_step_s(url: str, key: str, rows: int, seq_len: int, steps: int, offset: int = 0) -> float:
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=url, api_key=key)
    tc = service.create_lora_training_client(base_model=BASE, rank=8).result()
    data = _datums(rows, seq_len, offset)
    adam = types.AdamParams(learning_rate=1e-4)
    for _ in range(3):
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(adam).result()
    start = time.perf_counter()
    for _ in range(steps):
        fwd = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(adam)
        fwd.result()
        opt.result()
    elapsed = (time.perf_counter() - start) / steps
    service.close(status="success")
    return elapsed


def concurrent_tokens_per_s(server, tenants: int, rows: int, seq_len: int, steps: int) -> float:
    """Aggregate trained tokens/s of ``tenants`` concurrent tenants (``rows`` datums each per step)."""
    keys = [server.add_tenant(f"bench-{tenants}-{i}-{time.time_ns()}") for i in range(tenants)]
    barrier = threading.Barrier(tenants + 1)
    times: list[float] = [0.0] * tenants

    def tenant(i: int) -> None:
        import tinker
        from tinker import types

        service = tinker.ServiceClient(base_url=server.url, api_key=keys[i])
        tc = service.create_lora_training_client(base_model=BASE, rank=8).result()
        data = _datums(rows, seq_len, i)
        adam = types.AdamParams(learning_rate=1e-4)
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(adam).result()
        barrier.wait()
        start = time.perf_counter()
        for _ in range(steps):
            fwd = tc.forward_backward(data, "cross_entropy")
            opt = tc.optim_step(adam)
            fwd.result()
            opt.result()
        times[i] = time.perf_counter() - start
        service.close(status="success")

    threads = [threading.Thread(target=tenant, args=(i,)) for i in range(tenants)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return tenants * rows * seq_len * steps / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--rows", type=int, default=4, help="datums per tenant per step")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    from twinkle.server.config import ServerConfig, tiny_model_dir
    from twinkle.server.engine import LoRAEngine

    from conftest import start_server

    engine = LoRAEngine(tiny_model_dir(), max_adapters=2 * args.tenants + 4, max_rank=16)
    engine.warmup()
    config = ServerConfig(
        state_dir=tempfile.mkdtemp(prefix="twinkle-bench-"),
        max_adapters=2 * args.tenants + 4,
        max_adapters_per_tenant=4,
        requests_per_minute=10**6,
        long_poll_s=5.0,
    )
    server = start_server(config, engine)
    try:
        # alternate the two sides and keep each side's median: the machine may be shared
        locals_, remotes = [], []
        for round_ in range(3):
            locals_.append(in_process_step_s(engine, args.rows, args.seq_len, args.steps))
            key = server.add_tenant(f"bench-overhead-{round_}")
            remotes.append(http_step_s(server.url, key, args.rows, args.seq_len, args.steps))
        local, remote = sorted(locals_)[1], sorted(remotes)[1]
        total_rows = args.tenants * args.rows
        single = concurrent_tokens_per_s(server, 1, total_rows, args.seq_len, args.steps)
        before = len(server.state.scheduler.batches)
        multi = concurrent_tokens_per_s(server, args.tenants, args.rows, args.seq_len, args.steps)
        sizes = list(server.state.scheduler.batches)[before:]
    finally:
        server.stop()

    print(f"tiny-qwen2 LoRA r=8, {args.rows} rows x {args.seq_len} tokens per tenant-step, {args.steps} steps")
    print()
    print("| measurement | baseline | twinkle serve | ratio |")
    print("|---|---|---|---|")
    print(
        f"| training step, {args.rows} rows (ms, median of 3) | in-process engine {local * 1e3:.1f} | "
        f"tinker SDK over HTTP {remote * 1e3:.1f} | {remote / local:.2f}x time (+{(remote - local) * 1e3:.1f} ms) |"
    )
    print(
        f"| aggregate tokens/s, {total_rows} rows per step | 1 tenant {single:,.0f} | "
        f"{args.tenants} tenants {multi:,.0f} | {multi / single:.2f}x (goal >= 0.8x) |"
    )
    mean_batch = sum(sizes) / len(sizes) if sizes else 0.0
    print()
    print(
        f"{args.tenants}-tenant run: {len(sizes)} forward_backward passes, {mean_batch:.2f} tenants per pass on average"
    )


if __name__ == "__main__":
    main()
