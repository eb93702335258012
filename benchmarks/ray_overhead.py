"""Per-call overhead of ``forward_backward`` through Ray (twinkle-ray) vs local, side by side.

    python benchmarks/ray_overhead.py [--calls 20] [--rounds 5] [--batch 8]

One process holds both: the tiny Qwen2 (random weights from the bundled config) built in
this process (local mode, what a user would otherwise run) and the same model in one CPU
Ray actor behind the proxy (mode='ray', dp=1, so both do the same compute). Rounds
alternate between the two so machine noise hits both alike. Also timed: a call that does
no work (``zero_grad()`` with no gradients), which is the fixed cost of one proxy round trip.

Prints a table of median milliseconds per call, the overhead (ray - local) and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def batch_of(size: int) -> list[dict]:
    from twinkle import assets
    from twinkle.dataloader import DataLoader
    from twinkle.dataset import Dataset, DatasetMeta
    from twinkle.preprocessor import SelfCognitionProcessor

    meta = DatasetMeta(str(assets.path("datasets/self_cognition.jsonl")), data_slice=range(size))
    dataset = Dataset(dataset_meta=meta)
    dataset.set_template("Template", model_id=str(assets.path("tiny-qwen2")))
    dataset.map(SelfCognitionProcessor("twinkle大模型", "ModelScope社区"))
    dataset.encode()
    return next(iter(DataLoader(dataset=dataset, batch_size=size)))


def make_model(remote_group: str | None):
    from twinkle import assets
    from twinkle.model import TransformersModel

    model = TransformersModel(model_id=str(assets.path("tiny-qwen2")), device="cpu", remote_group=remote_group)
    model.set_optimizer("AdamW", lr=1e-4)
    return model


def per_call_ms(timed, after, model, calls: int) -> float:
    """Median ms of ``timed(model)``; ``after(model)`` runs untimed between calls."""
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        timed(model)
        samples.append((time.perf_counter() - start) * 1e3)
        after(model)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per mode")
    parser.add_argument("--batch", type=int, default=8, help="rows per forward_backward")
    args = parser.parse_args()

    import torch
    import twinkle
    from twinkle import DeviceGroup

    torch.set_num_threads(1)  # Ray gives a fractional-CPU actor one thread; match it
    twinkle.initialize(mode="local", seed=0)
    batch = batch_of(args.batch)
    local = make_model(None)
    ray_runtime = twinkle.initialize(
        mode="ray", groups=[DeviceGroup(name="default", ranks=1, device_type="cpu")], seed=0, num_cpus=2
    )
    remote = make_model("default")

    models = {"local": local, "ray": remote}
    cases = {  # (timed call, untimed call after it)
        "forward_backward": (lambda m: m.forward_backward(inputs=batch), lambda m: m.zero_grad()),
        "zero_grad (no-op)": (lambda m: m.zero_grad(), lambda m: None),
    }
    for timed, after in cases.values():  # warm up both (first-call allocations, lazy imports)
        for model in models.values():
            per_call_ms(timed, after, model, 3)
    results: dict[str, dict[str, list[float]]] = {name: {"local": [], "ray": []} for name in cases}
    for _ in range(args.rounds):
        for name, (timed, after) in cases.items():
            for mode, model in models.items():
                results[name][mode].append(per_call_ms(timed, after, model, args.calls))
    ray_runtime.shutdown()
    twinkle.shutdown()

    print(f"tiny Qwen2, batch {args.batch} rows, {args.rounds} rounds x {args.calls} calls, median ms per call")
    print(f"{'call':<18} {'local ms':>10} {'ray ms':>10} {'overhead ms':>12} {'ray/local':>10}")
    for name, by_mode in results.items():
        local_ms = statistics.median(by_mode["local"])
        ray_ms = statistics.median(by_mode["ray"])
        ratio = ray_ms / local_ms if local_ms > 0 else float("inf")
        print(f"{name:<18} {local_ms:>10.2f} {ray_ms:>10.2f} {ray_ms - local_ms:>12.2f} {ratio:>10.2f}x")


if __name__ == "__main__":
    main()
