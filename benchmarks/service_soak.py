"""`twinkle serve` soak: the database stays bounded while tenants work for a long time.

A real ``twinkle serve`` subprocess on the bundled tiny model (CPU), and ``--clients``
tenants using the official tinker SDK in this process, each looping over a realistic mix
at a modest pace: create a training run, train (forward_backward + optim_step, a future
each), save a checkpoint, sample from a snapshot, fetch futures, delete the checkpoint; a
new run every ``--steps-per-run`` steps (the old one is left idle and unloaded by the
server, as tinker clients that exit leave theirs). Every ``--every`` seconds the table
gets a row: database size (``state.sqlite`` plus its WAL), the server's RSS, the futures
stored, runs loaded.

The bound. Finished futures are deleted ``--future-ttl-minutes`` after creation by a sweep
that runs every ``min(60, ttl / 4, run_idle / 4)`` seconds, so at most the futures created
in the last ``ttl + sweep`` seconds are stored. Each client does one request at a time and
paces itself to at most ``1 / --pause`` requests per second, so there are at most
``clients * (ttl + sweep) / pause`` futures, each at most ``ROW_BYTES`` here (the largest
result of this mix is a forward_backward's per-token logprobs and losses: 2 x 4 bytes x
``seq_len`` x ``rows``, plus the row's fixed columns; sqlite pages round up). Runs,
sessions and checkpoint rows are a few hundred bytes each and grow by at most one run
per ``steps_per_run`` steps. The stated bound is twice that estimate plus 1 MiB for the
schema, tenants and the WAL's checkpoint size (sqlite checkpoints its WAL at 1,000 pages
= 4 MiB, so the WAL adds up to 4 MiB more): ``bound = 2 * futures_max * ROW_BYTES + 5 MiB``.
Without pruning the database grows with the soak's length; with it, it flattens after
``ttl`` minutes. The soak fails (exit code 1) when the database ever exceeds the bound.

    python benchmarks/service_soak.py                        # 30 minutes, 3 clients, TTL 5 min
    python benchmarks/service_soak.py --minutes 3 --every 20 # a quick check
    python benchmarks/service_soak.py --out benchmarks/results/service_soak-$(date +%Y%m%d).md
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

from http_service import ServeProcess  # the `twinkle serve` subprocess the benchmarks share

os.environ.setdefault("TINKER_TELEMETRY", "0")

BASE = "twinkle/tiny-qwen2"
#: fixed columns of one futures row (ids, kind, status, timestamps) and sqlite's per-row overhead.
ROW_OVERHEAD = 512


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _db_bytes(state_dir: Path) -> tuple[int, int]:
    """(the database file, its WAL) in bytes."""
    sizes = []
    for name in ("state.sqlite", "state.sqlite-wal"):
        try:
            sizes.append((state_dir / name).stat().st_size)
        except OSError:
            sizes.append(0)
    return sizes[0], sizes[1]


def _counts(state_dir: Path) -> tuple[int, int, int]:
    """(futures stored, runs loaded, checkpoints) read from the server's database (read-only)."""
    try:
        db = sqlite3.connect(f"file:{state_dir / 'state.sqlite'}?mode=ro", uri=True, timeout=5)
        try:
            futures = db.execute("SELECT COUNT(*) FROM futures").fetchone()[0]
            runs = db.execute("SELECT COUNT(*) FROM runs WHERE state = 'active'").fetchone()[0]
            ckpts = db.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0]
        finally:
            db.close()
        return futures, runs, ckpts
    except sqlite3.Error:
        return -1, -1, -1


class Client(threading.Thread):
    """One tenant's loop over the mix; counts what it did and the errors it saw."""

    def __init__(self, index: int, url: str, key: str, args: argparse.Namespace, stop: threading.Event) -> None:
        super().__init__(daemon=True, name=f"soak-client-{index}")
        self.index, self.url, self.key, self.args, self.stop_event = index, url, key, args, stop
        self.done: dict[str, int] = {}
        self.errors: list[str] = []
        self._last = 0.0

    def _paced(self, what: str, fn, *args):
        """One request ``fn(*args)``: wait so requests are at least ``pause`` seconds apart, then run and count it."""
        wait = self._last + self.args.pause - time.monotonic()
        if wait > 0:
            self.stop_event.wait(wait)
        self._last = time.monotonic()
        out = fn(*args)
        self.done[what] = self.done.get(what, 0) + 1
        return out

    def _datums(self, step: int) -> list:
        import numpy as np
        from tinker import types

        out = []
        for r in range(self.args.rows):
            toks = [(self.index * 131 + step * 7 + r * 17 + i * 5) % 2900 + 5 for i in range(self.args.seq_len + 1)]
            out.append(
                types.Datum(
                    model_input=types.ModelInput.from_ints(toks[:-1]),
                    loss_fn_inputs={"target_tokens": np.array(toks[1:], dtype=np.int64)},
                )
            )
        return out

    def run(self) -> None:
        import tinker
        from tinker import types

        service = tinker.ServiceClient(base_url=self.url, api_key=self.key)
        rest = tinker.RestClient(base_url=self.url, api_key=self.key)
        adam = types.AdamParams(learning_rate=1e-3)
        step = 0
        while not self.stop_event.is_set():
            try:
                tc = self._paced("create", service.create_lora_training_client, BASE, 4).result()
                for k in range(self.args.steps_per_run):
                    if self.stop_event.is_set():
                        break
                    fb = self._paced("forward_backward", tc.forward_backward, self._datums(step), "cross_entropy")
                    opt = self._paced("optim_step", tc.optim_step, adam)
                    fb.result()
                    opt.result()
                    step += 1
                    if k % 4 == 3:  # a checkpoint, a sample from the current weights, then the checkpoint goes
                        path = self._paced("save", tc.save_state, f"soak-{step}").result().path
                        sampler = self._paced("snapshot", tc.save_weights_and_get_sampling_client).result()
                        prompt = types.ModelInput.from_ints([5 + (step % 50), 17, 29, 41])
                        params = types.SamplingParams(max_tokens=self.args.sample_tokens, seed=step, temperature=1.0)
                        self._paced("sample", sampler.sample, prompt, 2, params).result()
                        self._paced("delete", rest.delete_checkpoint_from_tinker_path, path).result()
            except Exception as exc:  # noqa: BLE001 - counted and reported; the soak goes on
                self.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                self.stop_event.wait(2.0)
        try:
            service.close(status="success")
        except Exception:  # noqa: BLE001
            pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="soak duration (default 30)")
    parser.add_argument("--clients", type=int, default=3, help="concurrent tenants (default 3)")
    parser.add_argument("--pause", type=float, default=1.0, help="least seconds between a client's requests")
    parser.add_argument("--rows", type=int, default=2, help="datums per forward_backward")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--sample-tokens", type=int, default=16)
    parser.add_argument("--steps-per-run", type=int, default=16, help="training steps before a client's next run")
    parser.add_argument("--future-ttl-minutes", type=float, default=5.0)
    parser.add_argument("--run-idle-minutes", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (keep the load low)")
    parser.add_argument("--every", type=float, default=60.0, help="seconds between table rows")
    parser.add_argument("--out", help="also write the report (markdown) here")
    args = parser.parse_args()

    from twinkle_server.store import Store

    ttl_s = args.future_ttl_minutes * 60
    sweep_s = max(0.2, min(60.0, args.run_idle_minutes * 60 / 4 or 60.0, ttl_s / 4 or 60.0))
    futures_max = int(args.clients * (ttl_s + sweep_s) / args.pause) + 1
    row_bytes = 2 * 4 * args.seq_len * args.rows + ROW_OVERHEAD + 1024  # + protobuf framing, names, metrics
    bound = 2 * futures_max * row_bytes + 5 * 1024 * 1024

    state_dir = Path(tempfile.mkdtemp(prefix="twinkle-soak-"))
    store = Store(state_dir / "state.sqlite")
    keys = [store.create_tenant(f"soak-{i}")[1] for i in range(args.clients)]
    store.close()
    server = ServeProcess(
        state_dir,
        4 * args.clients + 4,
        args.threads,
        extra_args=[
            "--device",
            "cpu",
            "--future-ttl-minutes",
            str(args.future_ttl_minutes),
            "--run-idle-minutes",
            str(args.run_idle_minutes),
        ],
    )
    stop = threading.Event()
    clients = [Client(i, server.url, keys[i], args, stop) for i in range(args.clients)]
    rows: list[tuple[float, float, float, int, int, int, int]] = []
    started = time.monotonic()
    for c in clients:
        c.start()
    lines = [
        f"# `twinkle serve` soak: {args.minutes:g} min, {args.clients} tinker-SDK clients "
        f"(started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Server: `twinkle serve --device cpu --threads {args.threads} --future-ttl-minutes "
        f"{args.future_ttl_minutes:g} --run-idle-minutes {args.run_idle_minutes:g}` on the bundled tiny model. "
        f"Each client: a request at most every {args.pause:g} s; {args.rows} x {args.seq_len}-token "
        f"forward_backward + optim_step; every 4 steps save_state, a snapshot sampler, sample 2 x "
        f"{args.sample_tokens} tokens, delete the checkpoint; a new run every {args.steps_per_run} steps.",
        "",
        f"Bound: at most {futures_max} futures stored (clients x (TTL {ttl_s:.0f} s + sweep {sweep_s:.0f} s) / "
        f"pause), at most {row_bytes} B each: 2 x {futures_max} x {row_bytes} B + 5 MiB = "
        f"**{bound / 2**20:.1f} MiB**.",
        "",
        "| minute | DB (MiB) | WAL (MiB) | server RSS (MiB) | futures stored | runs loaded | checkpoints "
        "| requests done |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    peak = 0
    try:
        end = started + args.minutes * 60
        next_row = started
        while True:
            now = time.monotonic()
            if now >= next_row or now >= end:
                main_db, wal = _db_bytes(state_dir)
                db = main_db + wal
                peak = max(peak, db)
                futures, runs, ckpts = _counts(state_dir)
                done = sum(sum(c.done.values()) for c in clients)
                rss = _rss_mb(server.proc.pid)
                row = (
                    f"| {(now - started) / 60:.1f} | {main_db / 2**20:.2f} | {wal / 2**20:.2f} | {rss:.0f} "
                    f"| {futures} | {runs} | {ckpts} | {done} |"
                )
                lines.append(row)
                print(row, flush=True)
                rows.append((now - started, db, _rss_mb(server.proc.pid), futures, runs, ckpts, done))
                next_row += args.every
                if server.proc.poll() is not None:
                    print("the server exited", flush=True)
                    break
            if now >= end:
                break
            time.sleep(min(1.0, max(0.05, min(next_row, end) - time.monotonic())))
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=60)
        server.stop()
    done: dict[str, int] = {}
    for c in clients:
        for k, v in c.done.items():
            done[k] = done.get(k, 0) + v
    errors = [e for c in clients for e in c.errors]
    ok = peak <= bound and server.proc.returncode is not None
    lines += [
        "",
        f"Requests: {', '.join(f'{k} {v}' for k, v in sorted(done.items()))}. Client errors: {len(errors)}"
        + (f" (first: {errors[0]})" if errors else "")
        + ".",
        "",
        f"Peak DB + WAL {peak / 2**20:.2f} MiB against the bound {bound / 2**20:.1f} MiB: "
        + ("**within the bound**." if peak <= bound else "**OVER THE BOUND**."),
    ]
    print("\n".join(lines[-3:]), flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0 if ok and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
