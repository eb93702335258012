"""Synchronous vs asynchronous GRPO: wall time to the same mean reward, sampler and trainer in two processes.

    CUDA_VISIBLE_DEVICES= python benchmarks/async_rl.py    # local mode, 6 runs x 5 seeds, 1 thread per process
    python benchmarks/async_rl.py --threads 2 --seeds 0,1,2,3,4 --runs sync,s1_tis,s2_tis,s2_plain
    python benchmarks/async_rl.py --mode ray           # trainer actor + sampler actor
    python benchmarks/async_rl.py --mode thread        # the sampler in a thread of the trainer's process

The task is examples/grpo.py's: the bundled tiny Qwen2, a 30-step warm-up, then GRPO on a LoRA
adapter over the problems ``a+b=`` (a, b in 0..``--max-operand``, default 2: nine problems, chance
0.2; ``--group`` samples each, default 16). The warm-up teaches the answer format (a digit, then
the end token); the digit is right in ``--demo-accuracy`` of its rows (default 0.5) and random
otherwise. Random digits alone teach the model that the answer does not depend on the problem,
and GRPO then climbed only from 0.2 to about 0.3 in 40 to 60 steps (2026-12-07), too little to
tell the runs apart; the imperfect demonstrations give it a dependence to sharpen.
Every run uses the same loop (``twinkle.rollout``): a :class:`RolloutWorker` thread in the trainer's
process drives the sampler (``--mode local``: a TorchSampler in a child process with its own
``--threads`` torch threads, reached through a pipe; ``ray``: an actor on group ``sampler``) into a
:class:`RolloutBuffer`; the trainer takes a batch, takes ``--minibatches`` optimizer steps on it
(PPO minibatches: the clip matters from the second on), and syncs the LoRA into the sampler. Only
the buffer's ``max_staleness`` and the loss's rollout correction change:

* ``sync``: ``max_staleness=0``, the sampler waits for every update (the synchronous loop);
* ``s1_tis`` / ``s2_tis``: staleness 1 / 2, decoupled PPO (AReaL): the trainer's log-probs of
  the batch before its first minibatch step are the ``proximal_logps`` (the PPO anchor, so the
  clip bounds the update), and token-level truncated importance sampling
  (``rollout_correction="token_truncate"``, clip 2) weights each token by
  ``exp(proximal - sampler)``: the staleness;
* ``s2_mis``: staleness 2, the same with masked importance sampling (``"token_mask"``, IcePop-style:
  a token whose weight leaves ``[0.5, 2]`` drops out; AReaL caps its behaviour weight the same way);
* ``s0_tis`` (not run by default): staleness 0 with the correction, a check that sampler and
  trainer agree (its rollout KL must be ~0 and its rewards those of ``sync``);
* ``s1_plain`` / ``s2_plain``: staleness 1 / 2, no correction (the PPO ratio is to the stale
  sampler's log-probs).

Besides time and reward, each run reports the loss's view of the staleness, averaged over its
optimizer steps: the PPO clip fraction (``clip_ratio``), the sampler-trainer KL
(``rollout_kl``, corrected runs) and the share of tokens whose weight was truncated or masked.

Each run repeats for every ``--seeds`` seed (the same warmed-up start per seed). Reported per run,
as mean +- sd over the seeds: wall time to reach the target (the first step where the mean reward
over the last ``--window`` steps reaches ``--target``), the speed-up over ``sync`` (mean times),
the final reward (mean of the last ``--window`` steps), seconds per step, the mean staleness of
consumed samples and the busy seconds of sampler and trainer. The reward curves (mean over seeds)
go side by side in a table. The results are written to ``benchmarks/results/async_rl-<date>.md``
(``--out`` to change). Nothing needs a GPU (``CUDA_VISIBLE_DEVICES=`` is fine).
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray starts its workers with nice 15; on a shared machine that starves the actors being timed
os.environ.setdefault("RAY_worker_niceness", "0")

RUNS = {
    "sync": dict(max_staleness=0, correction=None),
    "s0_tis": dict(max_staleness=0, correction="token_truncate"),  # a check: sampler and trainer agree
    "s1_tis": dict(max_staleness=1, correction="token_truncate"),
    "s2_tis": dict(max_staleness=2, correction="token_truncate"),
    "s2_mis": dict(max_staleness=2, correction="token_mask", clip_min=0.5),
    "s1_plain": dict(max_staleness=1, correction=None),
    "s2_plain": dict(max_staleness=2, correction=None),
}


def _sampler_process(conn, model_dir: str, seed: int, threads: int) -> None:
    """The child process of ``--mode local``: a TorchSampler that runs the calls sent over ``conn``."""
    import torch

    torch.set_num_threads(threads)
    import twinkle
    from twinkle.sampler import TorchSampler

    twinkle.initialize(mode="local", seed=seed)
    sampler = TorchSampler(model_id=model_dir, seed=seed, device="cpu")
    conn.send((True, None))
    while True:
        message = conn.recv()
        if message is None:
            break
        method, args, kwargs = message
        try:
            conn.send((True, getattr(sampler, method)(*args, **kwargs)))
        except BaseException as exc:  # sent back, raised in the trainer's process
            conn.send((False, f"{type(exc).__name__}: {exc}"))
    conn.close()


_WARM: dict[int, str] = {}  # seed -> a checkpoint of its warmed-up base model (local and thread modes)
_SAMPLERS: list = []  # local mode: one sampler process serves every run (each run syncs all weights first)


class SamplerProcess:
    """A TorchSampler in a child process (spawned, ``threads`` torch threads): ``sample`` and ``update_weights``.

    Requests, responses and the weights travel pickled over a pipe; the caller's thread waits on
    the pipe without holding the GIL, so the trainer's process keeps training meanwhile.
    """

    def __init__(self, model_dir: str, seed: int, threads: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_sampler_process, args=(child, model_dir, seed, threads), name="async-rl-sampler", daemon=True
        )
        self._process.start()
        child.close()
        self._lock = threading.Lock()
        self._receive()  # the sampler is loaded

    def _receive(self):
        ok, value = self._conn.recv()
        if not ok:
            raise RuntimeError(f"the sampler process failed: {value}")
        return value

    def _call(self, method: str, *args, **kwargs):
        with self._lock:
            self._conn.send((method, args, kwargs))
            return self._receive()

    def sample(self, *args, **kwargs):
        return self._call("sample", *args, **kwargs)

    def update_weights(self, weights, adapter_name=None, peft_config=None):
        weights = {name: tensor.detach().cpu() for name, tensor in dict(weights).items()}
        return self._call("update_weights", weights, adapter_name=adapter_name, peft_config=peft_config)

    def close(self) -> None:
        with self._lock:
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()


def problems(tokenizer, max_operand: int) -> list[dict]:
    return [
        {"input_ids": tokenizer.encode(f"{a}+{b}="), "user_data": {"answer": str(a + b)}}
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
    ]


def accuracy(text: str, answer: str) -> float:
    """1.0 when the last number in the completion is the answer (GSM8KAccuracyReward's rule)."""
    numbers = re.findall(r"-?\d+", text)
    return float(bool(numbers) and numbers[-1] == answer)


def run(name: str, seed: int, args: argparse.Namespace, groups: dict[str, str | None]) -> dict:
    """One run from the seed's warmed-up start; returns per-step rewards, times and staleness."""
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
    steps, lr, group_size = args.steps, args.lr, args.group
    rng = random.Random(seed)
    model_dir = str(assets.path("tiny-qwen2"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = problems(tokenizer, args.max_operand)

    import torch

    cached = _WARM.get(seed)
    model = TransformersModel(model_id=cached or model_dir, seed=seed, device="cpu", remote_group=groups["trainer"])
    model.set_optimizer("AdamW", lr=3e-3)
    for _ in range(0 if cached else 30):  # the answer format; the digit is right with --demo-accuracy, else random
        rows = []
        for problem in rng.choices(batch, k=32):
            digit = problem["user_data"]["answer"] if rng.random() < args.demo_accuracy else None
            digit = digit or str(rng.randint(0, 2 * args.max_operand))
            answer = tokenizer.encode(digit) + [tokenizer.eos_token_id]
            rows.append(build_input_feature(problem["input_ids"], answer))
        model.forward_backward(inputs=rows)
        model.clip_grad_and_step()
    if not cached and args.mode != "ray":  # every run of this seed starts from these weights
        _WARM[seed] = model.save(Path(args.workdir) / f"warm-seed{seed}", save_optimizer=False)
    if args.mode == "local":
        if not _SAMPLERS:
            _SAMPLERS.append(SamplerProcess(model_dir, seed, args.threads))
        sampler = _SAMPLERS[0]
    else:
        sampler = TorchSampler(model_id=model_dir, seed=seed, device="cpu", remote_group=groups["sampler"])
    engine = LocalCheckpointEngine()
    engine.sync(model, sampler)  # the full weights: the sampler may hold the previous run's
    torch.manual_seed(seed)  # the same LoRA initialisation for every run of the seed, warmed up here or loaded
    model.add_adapter_to_model("default", LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.set_optimizer("AdamW", lr=lr)
    loss_options = dict(epsilon=0.2, beta=0.0)
    if config["correction"]:
        loss_options.update(rollout_correction=config["correction"], rollout_clip_max=2.0)
        if config.get("clip_min"):
            loss_options["rollout_clip_min"] = config["clip_min"]
    model.set_loss("GRPOLoss", **loss_options)
    engine.sync(model, sampler, adapter_name="default")

    advantage_fn = GRPOAdvantage(scale="group")
    per_step = len(batch) * group_size
    sample_seconds: list[float] = []

    def postprocess(rollouts) -> None:  # in the worker thread: rewards and group advantages
        rewards = [accuracy(r.sequence.text, r.sequence.user_data["answer"]) for r in rollouts]
        for r, reward, adv in zip(rollouts, rewards, advantage_fn(rewards, num_generations=group_size)):
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

    decoupled = bool(config["correction"])  # AReaL: the anchor is the trainer's policy before this batch's steps
    forward_seconds = 0.0
    buffer = RolloutBuffer(batch_size=per_step, max_staleness=config["max_staleness"])
    worker = RolloutWorker(
        TimedSampler(),
        buffer,
        lambda: batch,
        SamplingParams(max_tokens=2, temperature=1.0, num_samples=group_size, seed=seed * 100_000),  # batch k: + k
        adapter_name="default",
        postprocess=postprocess,
    )
    rewards: list[float] = []
    elapsed: list[float] = []
    staleness: list[float] = []
    train_seconds = 0.0
    pauses: list[float] = []
    losses: dict[str, list[float]] = {}  # the loss's metrics per optimizer step (clip fraction, rollout_*)
    start = time.perf_counter()
    worker.start()
    try:
        for _ in range(steps):
            rollouts = buffer.get(per_step, timeout=600)
            version = buffer.version
            t0 = time.perf_counter()
            rows = [r.row(advantages=r.extra["advantage"]) for r in rollouts]
            if decoupled and args.minibatches > 1:
                # the proximal policy: the trainer's log-probs before the first step on this batch. With one
                # step per batch it equals the loss's default (the current policy, detached): not computed.
                logps = model.forward_only(inputs=rows)["logps"]
                for row, row_logps in zip(rows, logps):
                    row["proximal_logps"] = [float(x) for x in row_logps]
                forward_seconds += time.perf_counter() - t0
            size = -(-len(rows) // args.minibatches)
            size = -(-size // group_size) * group_size  # whole groups per minibatch
            for lo in range(0, len(rows), size):
                out = model.forward_backward(inputs=rows[lo : lo + size])
                for key in ("clip_ratio", "rollout_kl", "rollout_truncated_fraction", "rollout_masked_fraction"):
                    if key in out:
                        losses.setdefault(key, []).append(float(out[key]))
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
        "forward_seconds": forward_seconds,
        "dropped": buffer.dropped,
        "sync_pause_ms": 1e3 * statistics.fmean(pauses),
        "loss_metrics": {key: statistics.fmean(values) for key, values in losses.items()},
    }


def time_to(result: dict, target: float, window: int) -> tuple[int | None, float | None]:
    """The first step (1-based) whose trailing ``window``-step mean reward reaches ``target``, and its wall time."""
    rewards = result["rewards"]
    for i in range(window - 1, len(rewards)):
        if statistics.fmean(rewards[i - window + 1 : i + 1]) >= target:
            return i + 1, result["elapsed"][i]
    return None, None


def mean_sd(values: list[float]) -> str:
    """``mean +- sd`` over the seeds (just the value for one seed; ``-`` for none)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{3 if abs(values[0]) < 10 else 1}f}"
    digits = 3 if abs(statistics.fmean(values)) < 10 else 1
    return f"{statistics.fmean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"


def _loss_metric(runs: list[dict], key: str, other: str | int | None = None) -> str:
    """A loss metric's mean over the runs' optimizer steps (``other``: a second key, or the digits); ``-`` if absent."""
    digits = other if isinstance(other, int) else 3
    keys = [key] + ([other] if isinstance(other, str) else [])
    values = [r["loss_metrics"][k] for r in runs for k in keys if k in r.get("loss_metrics", {})]
    return f"{statistics.fmean(values):.{digits}f}" if values else "-"


def report(results: dict[str, list[dict]], args: argparse.Namespace, device: str) -> str:
    """The table (mean +- sd over the seeds) and the reward curves (mean over the seeds)."""
    window = args.window
    seeds = len(next(iter(results.values())))
    sync_times = [time_to(r, args.target, window)[1] for r in results.get("sync", [])]
    sync_time = statistics.fmean(sync_times) if sync_times and None not in sync_times else None
    lines = [
        f"# async_rl: synchronous vs asynchronous GRPO ({datetime.date.today().isoformat()})",
        "",
        f"`python benchmarks/async_rl.py {' '.join(sys.argv[1:])}`: {device}; steps {args.steps}, "
        f"seeds {args.seeds}, lr {args.lr}, {args.minibatches} minibatch step(s) per batch, "
        f"{(args.max_operand + 1) ** 2} prompts x {args.group} samples per step, warm-up demonstrations right "
        f"{args.demo_accuracy:.0%}; target: the mean reward over {window} steps >= {args.target} "
        f"(chance {1 / (2 * args.max_operand + 1):.2f}). Cells are mean +- sd over the {seeds} seed(s); "
        "`reached` counts the seeds that reached the target, and the time columns average those.",
        "",
        "| run | staleness | correction | reached | steps to target | s to target | speed-up vs sync | "
        f"final reward (last {window}) | s per step | mean staleness | sampler busy s | trainer busy s | "
        "sync pause ms | dropped | PPO clip fraction | rollout KL | tokens truncated / masked |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        config = RUNS[name]
        hits = [time_to(r, args.target, window) for r in runs]
        reached = [(step, seconds) for step, seconds in hits if step is not None]
        seconds = statistics.fmean(s for _, s in reached) if reached else None
        speedup = f"{sync_time / seconds:.2f}x" if sync_time and seconds and len(reached) == len(runs) else "-"
        correction = config["correction"] or "-"
        if config["correction"] and args.minibatches > 1:
            correction += " + proximal"
        lines.append(
            f"| {name} | {config['max_staleness']} | {correction} | {len(reached)}/{len(runs)} | "
            f"{mean_sd([float(s) for s, _ in reached])} | {mean_sd([t for _, t in reached])} | {speedup} | "
            f"{mean_sd([statistics.fmean(r['rewards'][-window:]) for r in runs])} | "
            f"{mean_sd([r['elapsed'][-1] / len(r['rewards']) for r in runs])} | "
            f"{statistics.fmean(r['staleness'] for r in runs):.2f} | "
            f"{mean_sd([r['sample_seconds'] for r in runs])} | {mean_sd([r['train_seconds'] for r in runs])} | "
            f"{statistics.fmean(r['sync_pause_ms'] for r in runs):.1f} | {sum(r['dropped'] for r in runs)} | "
            f"{_loss_metric(runs, 'clip_ratio')} | {_loss_metric(runs, 'rollout_kl', 4)} | "
            f"{_loss_metric(runs, 'rollout_truncated_fraction', 'rollout_masked_fraction')} |"
        )
    lines += [
        "",
        f"Reward curves (mean reward per step over {args.every} steps and the seeds; mean wall seconds in brackets):",
        "",
    ]
    lines.append("| step | " + " | ".join(results) + " |")
    lines.append("|---|" + "---|" * len(results))
    for i in range(args.every - 1, args.steps, args.every):
        cells = []
        for runs in results.values():
            reward = statistics.fmean(statistics.fmean(r["rewards"][max(0, i - args.every + 1) : i + 1]) for r in runs)
            cells.append(f"{reward:.3f} ({statistics.fmean(r['elapsed'][i] for r in runs):.0f}s)")
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated; every run repeats per seed")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--group", type=int, default=16, help="samples per prompt")
    parser.add_argument(
        "--demo-accuracy", type=float, default=0.5, help="share of warm-up answers that are right (else random)"
    )
    parser.add_argument("--max-operand", type=int, default=2, help="problems a+b= with a, b in 0..this")
    parser.add_argument("--minibatches", type=int, default=2, help="optimizer steps per batch (PPO minibatches)")
    parser.add_argument("--runs", default=",".join(name for name in RUNS if name != "s0_tis"))
    parser.add_argument("--target", type=float, default=0.35)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--mode", choices=("local", "thread", "ray"), default="local")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (local and thread modes)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import twinkle
    from twinkle import DeviceGroup

    if args.mode != "ray":
        import torch

        torch.set_num_threads(args.threads)  # the trainer's process (the sampler's child sets its own)
    else:  # one local cluster for every run (actors get 1 CPU each: 1 torch thread)
        import ray

        for attempt in range(3):  # Ray gives its raylet a fixed 30 s to come up: a busy machine can miss it
            try:
                ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
                break
            except Exception:
                ray.shutdown()
                if attempt == 2:
                    raise
    started = time.perf_counter()
    loads = [os.getloadavg()[0]]
    workdir = tempfile.TemporaryDirectory(prefix="async-rl-")
    args.workdir = workdir.name
    results: dict[str, list[dict]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in args.runs.split(","):
            if args.mode == "ray":
                groups = [
                    DeviceGroup(name="trainer", ranks=1, device_type="cpu"),
                    DeviceGroup(name="sampler", ranks=1, device_type="cpu"),
                ]
                runtime = twinkle.initialize(mode="ray", groups=groups, seed=seed)
                placement = {"trainer": "trainer", "sampler": "sampler"}
            else:
                runtime = twinkle.initialize(mode="local", seed=seed)
                placement = {"trainer": None, "sampler": None}
            try:
                result = run(name, seed, args, placement)
            finally:
                runtime.shutdown()
            loads.append(os.getloadavg()[0])
            print(
                f"{name} seed {seed}: final {statistics.fmean(result['rewards'][-args.window :]):.3f} in "
                f"{result['elapsed'][-1]:.1f}s (load {loads[-1]:.1f})",
                flush=True,
            )
            results.setdefault(name, []).append(result)
    for sampler in _SAMPLERS:
        sampler.close()
    workdir.cleanup()
    threads = f", {args.threads} torch thread(s) per process" if args.mode != "ray" else ""
    device = (
        f"{os.cpu_count()} CPU cores, mode {args.mode}{threads}; 1-min load average {min(loads):.1f} to "
        f"{max(loads):.1f} (sampled before and after each run); {time.perf_counter() - started:.0f} s in all"
    )
    text = report(results, args, device)
    print(text)
    name = f"async_rl-{datetime.date.today().isoformat()}.md"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / name
    if out.is_dir():  # --out DIR: the default file name inside it
        out = out / name
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
