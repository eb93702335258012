"""`twinkle serve` throughput: HTTP overhead per step, and 8 tenants against 1.

The server runs as a real ``twinkle serve`` subprocess on 127.0.0.1 (its own interpreter,
so the clients never contend with the server's worker for a GIL); the clients are the
official tinker SDK in this process, pinned to the first core while the server runs on the
others (``--no-pin`` to share all cores): clients stand in for other machines, so their own
CPU work does not slow the server being measured. Two comparisons, side by side,
alternating rounds:

1. Overhead per training step (forward_backward + optim_step): the same LoRAEngine called
   in-process (what a user without the service would run) against the tinker SDK over HTTP.
2. Aggregate throughput: 1 tenant training on a batch of ``tenants x rows`` datums per step
   against ``tenants`` tenants each training on ``rows`` datums per step, concurrently
   (same total batch). The server batches the tenants' requests into multi-LoRA passes.
   Goal: the 8-tenant aggregate tokens/s at least 0.8x the single tenant's. The table gives
   the ratio of the two phases' medians and the median of the per-round ratios (a round runs
   both phases back to back, so its ratio sees one machine load: the steadier figure where
   other jobs share the cores), and the server's CPU time per step of the timed steps in each
   phase: their ratio is the aggregate ratio of a server that has its core to itself (the
   figure other jobs on a shared machine cannot move). It also shows how many tenants each
   pass of the 8-tenant runs held (from the server's ``--stats-file``).
3. The 8 concurrent SDK clients against the engine itself stepping the same 8 tenants in one
   pass per step (the best the server's batching can do). Goal on a GPU: >= 0.7x.

    python benchmarks/http_service.py                  # defaults: 8 tenants, 4 rows x 64 tokens, 3 rounds
    python benchmarks/http_service.py --steps 20 --seq-len 128 --rounds 5
    python benchmarks/http_service.py --no-pin         # clients and server on every core
    # GPU, Qwen2.5-0.5B shape with random weights:
    python benchmarks/http_service.py --shape 0.5b --rows 1 --seq-len 2048 --steps 5 --out $OUT

``--out DIR`` also writes the tables (``http_service-<shape>-<time>.md``, with the command and
the load average) and the raw figures (``.json``) there. The server is started as
``twinkle serve``'s own entry point in a ``python -c`` subprocess of this interpreter (it
inherits ``PYTHONPATH``), so the benchmark also runs where the packages are on
``PYTHONPATH`` (``twinkle_core/src``, ``plugins/twinkle-server/src``, wheels installed with
``pip install --target``) and no plugin entry point is registered.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

os.environ.setdefault("TINKER_TELEMETRY", "0")

BASE = "twinkle/tiny-qwen2"  # the model name clients use (``--model-name`` of the server)
#: LoRA on attention and MLP, as the SDK clients ask (``train_unembed=False``) on both sides.
BODY_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    from twinkle_server.engine import Datum

    return [
        Datum(d.model_input.to_ints(), {"target_tokens": d.loss_fn_inputs["target_tokens"].to_numpy()}) for d in datums
    ]


def in_process_step_s(engine, rows: int, seq_len: int, steps: int) -> float:
    """Seconds per step of the engine called directly (no server)."""
    from twinkle_server.engine import BatchJob

    slot = engine.create_slot(8, targets=BODY_TARGETS)
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


def in_process_tokens_per_s(engine, tenants: int, rows: int, seq_len: int, steps: int) -> float:
    """Aggregate trained tokens/s of ``tenants`` slots stepped together through the engine itself (no server).

    What the server's batching does at best: each step is one packed pass holding every
    tenant's ``rows`` datums (``forward_backward`` with one job per slot), then the slots'
    optimizer steps together (``optim_steps``).
    """
    from twinkle_server.engine import BatchJob

    slots = [engine.create_slot(8, targets=BODY_TARGETS) for _ in range(tenants)]
    data = [_engine_datums(_datums(rows, seq_len, i)) for i in range(tenants)]
    hyper = {"learning_rate": 1e-4}
    try:

        def step() -> None:
            engine.forward_backward([BatchJob(slot, d) for slot, d in zip(slots, data)])
            engine.optim_steps([(slot, hyper) for slot in slots])

        for _ in range(3):
            step()
        _synchronize(engine)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _synchronize(engine)
        return tenants * rows * seq_len * steps / (time.perf_counter() - start)
    finally:
        for slot in slots:
            engine.free_slot(slot)


def _synchronize(engine) -> None:
    import torch

    if str(engine.device).startswith("cuda"):
        torch.cuda.synchronize()


def shaped_model_dir(shape: str, root: Path) -> Path:
    """A model directory of ``shape`` without weights (the server seeds random ones): ``tiny`` is the bundled model.

    The other shapes take their config from ``model_shapes.py`` and the bundled tokenizer (the
    benchmark's token ids stay below its vocabulary).
    """
    from twinkle_server.config import tiny_model_dir

    tiny = tiny_model_dir()
    if shape == "tiny":
        return tiny
    import shutil

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from model_shapes import QWEN25_05B, QWEN25_7B, qwen2_config

    target = root / f"qwen2-{shape}"
    target.mkdir(parents=True, exist_ok=True)
    for item in tiny.iterdir():
        if item.name != "config.json" and item.is_file():
            shutil.copy(item, target / item.name)
    config = json.loads((tiny / "config.json").read_text())
    config.update(qwen2_config({"0.5b": QWEN25_05B, "7b": QWEN25_7B}[shape]))
    (target / "config.json").write_text(json.dumps(config, indent=1))
    return target


def _training_client(url: str, key: str):
    import tinker

    service = tinker.ServiceClient(base_url=url, api_key=key)
    return service, service.create_lora_training_client(base_model=BASE, rank=8, train_unembed=False).result()


def http_step_s(url: str, key: str, rows: int, seq_len: int, steps: int) -> float:
    """Seconds per step of one tinker SDK client against the server."""
    from tinker import types

    service, tc = _training_client(url, key)
    data = _datums(rows, seq_len, 0)
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


def concurrent_tokens_per_s(
    url: str, keys: list[str], rows: int, seq_len: int, steps: int, server_pid: int | None = None
) -> tuple[float, float, float]:
    """(aggregate trained tokens/s, wall-clock start, server CPU seconds) of ``len(keys)`` concurrent tenants.

    Each tenant trains on ``rows`` datums per step. The server's CPU time (``server_pid``, else 0)
    covers the timed steps only, as the throughput does (not the clients' setup and warm-up step).
    """
    from tinker import types

    tenants = len(keys)
    barrier = threading.Barrier(tenants + 1)
    clients = [None] * tenants
    errors: list[BaseException] = []

    def tenant(i: int) -> None:
        try:
            service, tc = _training_client(url, keys[i])
            clients[i] = (service, tc)
            data = _datums(rows, seq_len, i)
            adam = types.AdamParams(learning_rate=1e-4)
            tc.forward_backward(data, "cross_entropy").result()
            tc.optim_step(adam).result()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()
            return
        barrier.wait()
        for _ in range(steps):
            fwd = tc.forward_backward(data, "cross_entropy")
            opt = tc.optim_step(adam)
            fwd.result()
            opt.result()

    threads = [threading.Thread(target=tenant, args=(i,)) for i in range(tenants)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        raise RuntimeError(f"a tenant failed to start: {errors[:1]}") from None
    wall_start = time.time()
    server0 = _cpu_s(server_pid) if server_pid else 0.0
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    server_s = _cpu_s(server_pid) - server0 if server_pid else 0.0
    for service, _ in clients:
        service.close(status="success")
    return tenants * rows * seq_len * steps / wall, wall_start, server_s


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by this process, or by process ``pid`` (Linux /proc)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def pinned(cores: set[int] | None) -> Iterator[None]:
    """Run this thread, and the threads it starts meanwhile, on ``cores`` (no-op for ``None``)."""
    if not cores:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def split_cores(server_threads: int) -> tuple[set[int] | None, set[int] | None]:
    """(client cores, server cores): the first core for the clients, the next ``server_threads`` for the server.

    Stands in for clients on other machines (a deployment): the SDK clients' CPU (about
    20 ms per tenant-step) then cannot slow the server. ``(None, None)`` on one core.
    """
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None, None
    return {cores[0]}, set(cores[1 : 1 + server_threads])


#: ``twinkle serve`` without the plugin lookup of the ``twinkle`` command line (arguments after ``-c``).
SERVE_LAUNCHER = (
    "import argparse, sys; from twinkle_server.cli import add_serve_arguments, serve_main; "
    "p = argparse.ArgumentParser(prog='twinkle serve'); add_serve_arguments(p); "
    "sys.exit(serve_main(p.parse_args(sys.argv[1:])))"
)


class ServeProcess:
    """``twinkle serve`` in a subprocess on an ephemeral loopback port."""

    def __init__(
        self,
        state_dir: Path,
        adapters: int,
        threads: int,
        cores: set[int] | None = None,
        model: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.state_dir = state_dir
        self.stats_file = state_dir / "stats.json"
        port_file = state_dir / "port"
        self.log = open(state_dir / "server.log", "ab")
        # `twinkle serve`'s own parser and entry point, called directly: the same server whether the
        # plugin is installed (entry points) or only on PYTHONPATH, as on a GPU box with wheels in a
        # --target directory (there `twinkle serve` has no plugin registration to find)
        cmd = [sys.executable, "-c", SERVE_LAUNCHER]
        cmd += [
            "--state-dir",
            str(state_dir),
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--max-adapters",
            str(adapters),
            "--max-adapters-per-tenant",
            "4",
            "--requests-per-minute",
            str(10**6),
            "--log-level",
            "warning",
            "--threads",
            str(threads),
            "--stats-file",
            str(self.stats_file),
        ]
        if model is not None:
            cmd += ["--model", str(model), "--model-name", BASE]
        cmd += list(extra_args)
        pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=pin)
        deadline = time.monotonic() + 300
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError((state_dir / "server.log").read_text()[-3000:])
            time.sleep(0.1)
        self.url = f"http://127.0.0.1:{port_file.read_text().strip()}"

    def stop(self) -> dict:
        """Stop the server gracefully; returns its pass statistics."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        return json.loads(self.stats_file.read_text()) if self.stats_file.exists() else {"records": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--rows", type=int, default=4, help="datums per tenant per step")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each comparison (medians)")
    parser.add_argument(
        "--server-threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="torch threads of the server (default: all cores but one, which the clients use)",
    )
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clients on the first core, the server on the others (clients standing in for other machines)",
    )
    parser.add_argument(
        "--shape",
        choices=["tiny", "0.5b", "7b"],
        default="tiny",
        help="base model: the bundled tiny model, or a Qwen2.5 shape with seeded random weights (GPU)",
    )
    parser.add_argument("--out", type=Path, help="also write the tables (.md) and the raw figures (.json) here")
    args = parser.parse_args()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    client_cores, server_cores = split_cores(args.server_threads) if args.pin else (None, None)

    from twinkle_server.engine import LoRAEngine
    from twinkle_server.store import Store

    state_dir = Path(tempfile.mkdtemp(prefix="twinkle-bench-"))
    store = Store(state_dir / "state.sqlite")  # tenants, as `twinkle serve --add-tenant` makes them
    overhead_keys = [store.create_tenant(f"overhead-{r}")[1] for r in range(args.rounds)]
    single_keys = [store.create_tenant(f"single-{r}")[1] for r in range(args.rounds)]
    multi_keys = [[store.create_tenant(f"multi-{r}-{i}")[1] for i in range(args.tenants)] for r in range(args.rounds)]
    store.close()

    import torch

    torch.set_num_threads(args.server_threads)  # the in-process baseline gets the server's threads
    model_dir = shaped_model_dir(args.shape, state_dir)
    engine = LoRAEngine(model_dir, max_adapters=args.tenants + 1, max_rank=16)
    engine.warmup()
    # every run of the benchmark keeps its adapter loaded: size the pool for all of them
    server = ServeProcess(
        state_dir,
        args.rounds * (args.tenants + 2) + 4,
        args.server_threads,
        server_cores,
        None if args.shape == "tiny" else model_dir,
    )
    windows: dict[str, list[tuple[float, float]]] = {"1 tenant": [], f"{args.tenants} tenants": []}
    try:
        locals_, remotes, singles, multis, directs = [], [], [], [], []
        for r in range(args.rounds):
            directs.append(in_process_tokens_per_s(engine, args.tenants, args.rows, args.seq_len, args.steps))
            locals_.append(in_process_step_s(engine, args.rows, args.seq_len, args.steps))
            with pinned(client_cores):
                remotes.append(http_step_s(server.url, overhead_keys[r], args.rows, args.seq_len, args.steps))
        total_rows = args.tenants * args.rows
        cpu = {"1 tenant": [0.0, 0.0, 0.0], f"{args.tenants} tenants": [0.0, 0.0, 0.0]}
        #: server CPU seconds per step of the timed steps, per round
        steady_cpu: dict[str, list[float]] = {"1 tenant": [], f"{args.tenants} tenants": []}
        for r in range(args.rounds):
            for label, keys, rows, out in (
                ("1 tenant", [single_keys[r]], total_rows, singles),
                (f"{args.tenants} tenants", multi_keys[r], args.rows, multis),
            ):
                client0, server0, wall0 = _cpu_s(), _cpu_s(server.proc.pid), time.perf_counter()
                with pinned(client_cores):
                    tps, start, steady = concurrent_tokens_per_s(
                        server.url, keys, rows, args.seq_len, args.steps, server.proc.pid
                    )
                steady_cpu[label].append(steady / args.steps)
                used = cpu[label]
                used[0] += _cpu_s() - client0
                used[1] += _cpu_s(server.proc.pid) - server0
                used[2] += time.perf_counter() - wall0
                out.append(tps)
                windows[label].append((start, time.time()))
    finally:
        stats = server.stop()

    def passes(label: str) -> list[dict]:
        return [
            rec
            for rec in stats["records"]
            if rec["kind"] == "forward_backward" and any(a <= rec["started"] <= b for a, b in windows[label])
        ]

    local, remote = statistics.median(locals_), statistics.median(remotes)
    single, multi = statistics.median(singles), statistics.median(multis)
    direct = statistics.median(directs)
    # rounds alternate the two phases, so a round's ratio compares phases minutes apart under the same
    # machine load; the median of those ratios is the robust figure on a shared machine
    paired = statistics.median(m / s for s, m in zip(singles, multis))
    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text)
        lines.append(text)

    emit(
        f"{args.shape} Qwen2 LoRA r=8 on {engine.device}, {args.rows} rows x {args.seq_len} tokens per "
        f"tenant-step, {args.steps} steps, "
        f"{args.rounds} alternating rounds (medians); server: `twinkle serve` subprocess, "
        f"{args.server_threads} torch thread(s)"
        + (
            f" on cores {sorted(server_cores)}; clients: this process on cores {sorted(client_cores)}"
            if server_cores
            else "; clients: this process"
        )
    )
    emit()
    emit("| measurement | baseline | twinkle serve | ratio |")
    emit("|---|---|---|---|")
    emit(
        f"| training step, {args.rows} rows (ms) | in-process engine {local * 1e3:.1f} | "
        f"tinker SDK over HTTP {remote * 1e3:.1f} | {remote / local:.2f}x time (+{(remote - local) * 1e3:.1f} ms) |"
    )
    emit(
        f"| aggregate tokens/s, {total_rows} rows per step | 1 tenant {single:,.0f} | "
        f"{args.tenants} tenants {multi:,.0f} | {multi / single:.2f}x of the medians, {paired:.2f}x median of the "
        "per-round ratios (goal >= 0.8x) |"
    )
    cpu_single = statistics.median(steady_cpu["1 tenant"])
    cpu_multi = statistics.median(steady_cpu[f"{args.tenants} tenants"])
    emit(
        f"| server CPU per step, timed steps (ms) | 1 tenant {cpu_single * 1e3:.0f} | {args.tenants} tenants "
        f"{cpu_multi * 1e3:.0f} | {cpu_single / cpu_multi:.2f}x (the aggregate ratio of a server with a core of "
        "its own) |"
    )
    emit(
        f"| aggregate tokens/s, {args.tenants} tenants x {args.rows} rows | engine direct (one pass per step) "
        f"{direct:,.0f} | tinker SDK, {args.tenants} concurrent clients {multi:,.0f} | {multi / direct:.2f}x "
        "(goal >= 0.7x) |"
    )
    emit()
    emit(
        "per round, aggregate tokens/s (1 tenant / N tenants = ratio): "
        + ", ".join(f"{s:,.0f} / {m:,.0f} = {m / s:.2f}" for s, m in zip(singles, multis))
    )
    emit()
    emit(
        "| phase (all rounds) | wall s | server CPU s | clients' CPU s | passes | tenants per pass | pass ms "
        "| gather wait ms | answer + optim_steps ms |"
    )
    emit("|---|---|---|---|---|---|---|---|---|")
    for label, (client_s, server_s, wall_s) in cpu.items():
        recs = passes(label)
        n = max(1, len(recs))
        emit(
            f"| {label} | {wall_s:.1f} | {server_s:.1f} | {client_s:.1f} | {len(recs)} | "
            f"{sum(r['tenants'] for r in recs) / n:.2f} | {1e3 * sum(r['seconds'] for r in recs) / n:.0f} | "
            f"{1e3 * sum(r['waited_s'] for r in recs) / n:.0f} | {1e3 * sum(r['after_s'] for r in recs) / n:.0f} |"
        )
    emit()
    histogram = Counter(rec["tenants"] for rec in passes(f"{args.tenants} tenants"))
    emit(f"{args.tenants}-tenant runs, passes by the number of tenants they held:")
    emit()
    emit("| tenants in the pass | " + " | ".join(str(k) for k in range(1, args.tenants + 1)) + " |")
    emit("|---|" + "---|" * args.tenants)
    emit("| passes | " + " | ".join(str(histogram.get(k, 0)) for k in range(1, args.tenants + 1)) + " |")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"http_service-{args.shape}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        command = "python benchmarks/http_service.py " + " ".join(sys.argv[1:])
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        (args.out / f"{stem}.md").write_text(
            f"`{command}` (load average before the run: {load_before}, after: {load})\n\n" + "\n".join(lines) + "\n"
        )
        summary = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "device": str(engine.device),
            "in_process_step_s": locals_,
            "http_step_s": remotes,
            "single_tokens_per_s": singles,
            "multi_tokens_per_s": multis,
            "direct_tokens_per_s": directs,
            "ratio_of_medians": multi / single,
            "median_round_ratio": paired,
            "sdk_vs_direct": multi / direct,
            "cpu": cpu,
            "server_cpu_per_step_s": steady_cpu,
            "passes_by_tenants": {str(k): v for k, v in sorted(histogram.items())},
        }
        (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
        print(f"wrote {args.out / stem}.md and .json")


if __name__ == "__main__":
    main()
