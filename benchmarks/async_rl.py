"""Synchronous vs asynchronous GRPO: wall time to the same mean reward, sampler and trainer in two processes.

    python benchmarks/async_rl.py                       # ray mode: trainer actor + sampler actor
    python benchmarks/async_rl.py --steps 60 --runs sync,s1_tis,s2_tis,s2_plain
    python benchmarks/async_rl.py --mode local          # the sampler in a thread of this process

The task is examples/grpo.py's: the bundled tiny Qwen2, a 30-step format warm-up, then GRPO on a
LoRA adapter over the nine problems ``a+b=`` (a, b in 0..2; 8 samples each; chance 0.2). Every run
uses the same loop (``twinkle.rollout``): a :class:`RolloutWorker` thread in the driver drives the
sampler (a Ray actor on group ``sampler``) into a :class:`RolloutBuffer`; the trainer (a Ray actor
on group ``trainer``) takes a batch, steps, and syncs the LoRA into the sampler. Only the buffer's
``max_staleness`` and the loss's rollout correction change:

* ``sync``: ``max_staleness=0``, the sampler waits for every update (the synchronous loop);
* ``s1_tis`` / ``s2_tis``: staleness 1 / 2 with token-level truncated importance sampling
  (``rollout_correction="token_truncate"``, clip 2);
* ``s2_plain``: staleness 2, no correction (the PPO ratio is to the stale sampler's log-probs).

Reported per run: wall time to reach the target (the first step where the mean reward over the
last ``--window`` steps reaches ``--target``), the speed-up over ``sync`` at that point, the final
reward (mean of the last ``--window`` steps), the mean staleness of consumed samples and the share
of the sampler's time hidden behind training. The reward curves go side by side in a table. The
results are written to ``benchmarks/results/async_rl-<date>.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray starts its workers with nice 15; on a shared machine that starves the actors being timed
os.environ.setdefault("RAY_worker_niceness", "0")

RUNS = {
    "sync": dict(max_staleness=0, correction=None),
    "s1_tis": dict(max_staleness=1, correction="token_truncate"),
    "s2_tis": dict(max_staleness=2, correction="token_truncate"),
    "s2_plain": dict(max_staleness=2, correction=None),
}
MAX_OPERAND = 2
GROUP = 8


def problems(tokenizer) -> list[dict]:
    return [
        {"input_ids": tokenizer.encode(f"{a}+{b}="), "user_data": {"answer": str(a + b)}}
        for a in range(MAX_OPERAND + 1)
        for b in range(MAX_OPERAND + 1)
    ]


def accuracy(text: str, answer: str) -> float:
    """1.0 when the last number in the completion is the answer (GSM8KAccuracyReward's rule)."""
    numbers = re.findall(r"-?\d+", text)
    return float(bool(numbers) and numbers[-1] == answer)


def run(name: str, steps: int, seed: int, lr: float, groups: dict[str, str | None]) -> dict:
    """One run from the same warmed-up start; returns per-step rewards, times and staleness."""
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from twinkle import assets
    from twinkle.advantage import GRPOAdvantage
    from twinkle.checkpoint_engine import LocalCheckpointEngine
    from twinkle.data_format import SamplingParams
    from twinkle.data_format.sampling import build_input_feature
    from twinkle.model import TransformersModel
    from twinkle.rollout import RolloutBuffer, RolloutWorker
    from twinkle.sampler import TorchSampler

    config = RUNS[name]
    rng = random.Random(seed)
    model_dir = str(assets.path("tiny-qwen2"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = problems(tokenizer)

    model = TransformersModel(model_id=model_dir, seed=seed, device="cpu", remote_group=groups["trainer"])
    model.set_optimizer("AdamW", lr=3e-3)
    for _ in range(30):  # the answer *format* only: random digits
        rows = []
        for problem in rng.choices(batch, k=32):
            answer = tokenizer.encode(str(rng.randint(0, 2 * MAX_OPERAND))) + [tokenizer.eos_token_id]
            rows.append(build_input_feature(problem["input_ids"], answer))
        model.forward_backward(inputs=rows)
        model.clip_grad_and_step()
    sampler = TorchSampler(model_id=model_dir, seed=seed, device="cpu", remote_group=groups["sampler"])
    engine = LocalCheckpointEngine()
    engine.sync(model, sampler)
    model.add_adapter_to_model("default", LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.set_optimizer("AdamW", lr=lr)
    loss_options = dict(epsilon=0.2, beta=0.0)
    if config["correction"]:
        loss_options.update(rollout_correction=config["correction"], rollout_clip_max=2.0)
    model.set_loss("GRPOLoss", **loss_options)
    engine.sync(model, sampler, adapter_name="default")

    advantage_fn = GRPOAdvantage(scale="group")
    per_step = len(batch) * GROUP
    sample_seconds: list[float] = []

    def postprocess(rollouts) -> None:  # in the worker thread: rewards and group advantages
        rewards = [accuracy(r.sequence.text, r.sequence.user_data["answer"]) for r in rollouts]
        for r, reward, adv in zip(rollouts, rewards, advantage_fn(rewards, num_generations=GROUP)):
            r.extra.update(reward=reward, advantage=adv)

    class TimedSampler:  # the time the sampler spends sampling (to see how much of it training hides)
        def sample(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return sampler.sample(*args, **kwargs)
            finally:
                sample_seconds.append(time.perf_counter() - start)

        def update_weights(self, *args, **kwargs):
            return sampler.update_weights(*args, **kwargs)

    buffer = RolloutBuffer(batch_size=per_step, max_staleness=config["max_staleness"])
    worker = RolloutWorker(
        TimedSampler(),
        buffer,
        lambda: batch,
        SamplingParams(max_tokens=2, temperature=1.0, num_samples=GROUP, seed=seed * 100_000),  # batch k: + k
        adapter_name="default",
        postprocess=postprocess,
    )
    rewards: list[float] = []
    elapsed: list[float] = []
    staleness: list[float] = []
    train_seconds = 0.0
    pauses: list[float] = []
    start = time.perf_counter()
    worker.start()
    try:
        for _ in range(steps):
            rollouts = buffer.get(per_step, timeout=600)
            version = buffer.version
            t0 = time.perf_counter()
            rows = [r.row(advantages=r.extra["advantage"]) for r in rollouts]
            model.forward_backward(inputs=rows)
            model.clip_grad_and_step(max_grad_norm=1.0)
            train_seconds += time.perf_counter() - t0
            pauses.append(worker.sync_weights(model, adapter_name="default")["sync_pause_seconds"])
            rewards.append(statistics.fmean(r.extra["reward"] for r in rollouts))
            staleness.append(statistics.fmean(r.staleness(version) for r in rollouts))
            elapsed.append(time.perf_counter() - start)
    finally:
        worker.stop()
    return {
        "name": name,
        "rewards": rewards,
        "elapsed": elapsed,
        "staleness": statistics.fmean(staleness),
        "sample_seconds": sum(sample_seconds),
        "train_seconds": train_seconds,
        "dropped": buffer.dropped,
        "sync_pause_ms": 1e3 * statistics.fmean(pauses),
    }


def time_to(result: dict, target: float, window: int) -> tuple[int | None, float | None]:
    """The first step (1-based) whose trailing ``window``-step mean reward reaches ``target``, and its wall time."""
    rewards = result["rewards"]
    for i in range(window - 1, len(rewards)):
        if statistics.fmean(rewards[i - window + 1 : i + 1]) >= target:
            return i + 1, result["elapsed"][i]
    return None, None


def report(results: list[dict], args: argparse.Namespace, device: str) -> str:
    window = args.window
    sync = next((r for r in results if r["name"] == "sync"), None)
    sync_time = time_to(sync, args.target, window)[1] if sync else None
    lines = [
        f"# async_rl: synchronous vs asynchronous GRPO ({datetime.date.today().isoformat()})",
        "",
        f"`python benchmarks/async_rl.py {' '.join(sys.argv[1:])}`: {device}; steps {args.steps}, seed {args.seed}, "
        f"lr {args.lr}, 9 prompts x {GROUP} samples per step; target: the mean reward over {window} steps "
        f">= {args.target} (chance 0.2).",
        "",
        "| run | staleness | correction | steps to target | s to target | speed-up vs sync | final reward "
        f"(last {window}) | s per step | mean staleness | sampler busy s | trainer busy s | sync pause ms | dropped |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        config = RUNS[r["name"]]
        step, seconds = time_to(r, args.target, window)
        speedup = f"{sync_time / seconds:.2f}x" if sync_time and seconds else "-"
        final = statistics.fmean(r["rewards"][-window:])
        lines.append(
            f"| {r['name']} | {config['max_staleness']} | {config['correction'] or '-'} | {step or 'not reached'} | "
            f"{f'{seconds:.1f}' if seconds else '-'} | {speedup} | {final:.3f} | "
            f"{r['elapsed'][-1] / len(r['rewards']):.3f} | {r['staleness']:.2f} | {r['sample_seconds']:.1f} | "
            f"{r['train_seconds']:.1f} | {r['sync_pause_ms']:.1f} | {r['dropped']} |"
        )
    lines += ["", f"Reward curves (mean reward per step, every {args.every} steps; wall seconds in brackets):", ""]
    lines.append("| step | " + " | ".join(r["name"] for r in results) + " |")
    lines.append("|---|" + "---|" * len(results))
    for i in range(args.every - 1, args.steps, args.every):
        cells = [
            f"{statistics.fmean(r['rewards'][max(0, i - args.every + 1) : i + 1]):.3f} ({r['elapsed'][i]:.0f}s)"
            for r in results
        ]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--target", type=float, default=0.35)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--mode", choices=("ray", "local"), default="ray")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import twinkle
    from twinkle import DeviceGroup

    if args.mode == "ray":  # one local cluster for every run (actors get 1 CPU each: 1 torch thread)
        import ray

        for attempt in range(3):  # Ray gives its raylet a fixed 30 s to come up: a busy machine can miss it
            try:
                ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
                break
            except Exception:
                ray.shutdown()
                if attempt == 2:
                    raise
    results = []
    for name in args.runs.split(","):
        if args.mode == "ray":
            groups = [
                DeviceGroup(name="trainer", ranks=1, device_type="cpu"),
                DeviceGroup(name="sampler", ranks=1, device_type="cpu"),
            ]
            runtime = twinkle.initialize(mode="ray", groups=groups, seed=args.seed)
            placement = {"trainer": "trainer", "sampler": "sampler"}
        else:
            runtime = twinkle.initialize(mode="local", seed=args.seed)
            placement = {"trainer": None, "sampler": None}
        try:
            result = run(name, args.steps, args.seed, args.lr, placement)
        finally:
            runtime.shutdown()
        print(
            f"{name}: final {statistics.fmean(result['rewards'][-args.window :]):.3f} in {result['elapsed'][-1]:.1f}s",
            flush=True,
        )
        results.append(result)
    load = os.getloadavg()[0]
    device = f"{os.cpu_count()} CPU cores shared with other jobs (1-min load average {load:.1f} at the end)"
    device += f", mode {args.mode}"
    text = report(results, args, device)
    print(text)
    out = (
        Path(args.out)
        if args.out
        else (Path(__file__).parent / "results" / f"async_rl-{datetime.date.today().isoformat()}.md")
    )
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
