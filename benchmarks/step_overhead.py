"""What a training step loses to the host: eager steps against the GPU's own time and one CUDA graph.

    python benchmarks/step_overhead.py                   # 7B LoRA, 4 x 2048 tokens
    python benchmarks/step_overhead.py --row 0.5b-lora --steps 20

Builds ``TransformersModel`` with its default fast path (as ``train_throughput.py``'s ``ours``)
and times, in one process, on the same batches:

* ``eager``: ``forward_backward`` + ``clip_grad_and_step``, what users run.
* ``queued``: the same GPU work (forward, loss, backward, clip, AdamW) queued behind a GPU sleep,
  so the host is ahead of the GPU for the whole step; timed with CUDA events from the end of the
  sleep. The difference to ``eager`` bounds what the GPU waits for the host (Python, launch
  latency, the step's synchronizations); the GPU also starts each of these steps rested (idle
  for the sleep), which on a power-capped GPU is worth time of its own.
* ``graph``: the same work captured once as a CUDA graph and replayed (no launches at all: what
  is left is kernels and the gaps between them inside the graph).
* ``eager_rested`` / ``graph_rested`` (``--rested``): ``eager`` and ``graph`` with the GPU idle for
  half a second before each step, timed per step. Against ``queued`` they tell the host's share
  from a rested GPU's: a power-capped GPU runs a step faster when it starts cool.

Prints ms per step for each and the differences.
"""

from __future__ import annotations

import argparse
import sys
import time

import train_throughput as tt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--row", default="7b-lora", choices=sorted({**tt.ROWS, **tt.SMOKE_ROWS}))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rested", action="store_true", help="also eager and graph after 0.5 s of idle GPU")
    args = parser.parse_args()

    import torch
    from twinkle.model.transformers_model import TransformersModel

    shape, lora, batch_size = {**tt.ROWS, **tt.SMOKE_ROWS}[args.row]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = TransformersModel(config=tt.qwen_config(shape), torch_dtype="bfloat16", device="cuda", seed=0)
    if lora:
        model.add_adapter_to_model("default", tt.lora_config())
    model.set_optimizer("AdamW", lr=1e-5, capturable=True)
    batches = [tt.random_batch(batch_size, shape["vocab_size"], s).cuda() for s in range(4)]
    state = model._state(None)

    def eager(ids):
        model.forward_backward(inputs={"input_ids": ids, "labels": ids})
        return model.clip_grad_and_step(max_grad_norm=1.0)

    def work(batch):
        """forward, loss, backward, clip and AdamW: no host reads."""
        state.window_tokens = float(batch["num_label_tokens"])
        state.grads_final = False
        outputs = model._run(batch)
        loss = state.loss(batch, outputs).loss
        loss.backward()
        norm = model._clip(state, 1.0, 2.0)
        state.optimizer.step()
        return loss, norm

    rows = []

    def report(name, ms):
        rows.append((name, ms))
        print(f"[{name}] {ms:.1f} ms per step", file=sys.stderr, flush=True)

    def rested(run):
        """ms per step of ``run()``, each step started on a GPU idle for half a second."""
        times = []
        for s in range(args.steps):
            torch.cuda.synchronize()
            time.sleep(0.5)
            t = time.perf_counter()
            run(s)
            torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t))
        return sum(times) / len(times)

    for _ in range(3):
        eager(batches[0])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(args.steps):
        eager(batches[s % 4])
    torch.cuda.synchronize()
    report("eager", 1e3 * (time.perf_counter() - t0) / args.steps)
    if args.rested:
        report("eager_rested", rested(lambda s: eager(batches[s % 4])))

    prepared = [model._prepare(state, {"input_ids": b, "labels": b}, {}) for b in batches]
    times, host = [], []
    for s in range(args.steps):
        model.zero_grad()
        torch.cuda._sleep(1_000_000_000)  # ~0.5 s: the host queues the whole step meanwhile
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t_host = time.perf_counter()
        work(prepared[s % 4])
        host.append(1e3 * (time.perf_counter() - t_host))
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    report("queued", sum(times) / len(times))

    static = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in prepared[0].items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            model.zero_grad()
            work(static)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    model.zero_grad()
    graph = torch.cuda.CUDAGraph()
    t_capture = time.perf_counter()
    with torch.cuda.graph(graph):
        static_loss, static_norm = work(static)
    capture_s = time.perf_counter() - t_capture
    torch.cuda.synchronize()
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    losses = []

    def replay(s):
        for key, value in prepared[s % 4].items():
            if torch.is_tensor(value):
                static[key].copy_(value, non_blocking=True)
        graph.replay()
        losses.append(float(static_loss.detach()))

    t0 = time.perf_counter()
    for s in range(args.steps):
        replay(s)
    torch.cuda.synchronize()
    report("graph", 1e3 * (time.perf_counter() - t0) / args.steps)
    if args.rested:
        report("graph_rested", rested(replay))

    device = torch.cuda.get_device_name(0)
    print(f"# step_overhead: {args.row}, {args.steps} steps, {device}, torch {torch.__version__}")
    # not the host's launch cost alone: launches block once CUDA's queue is full behind the sleep
    print(f"host time in a queued step: {sum(host) / len(host):.1f} ms")
    print(f"capture {capture_s:.1f} s; graph losses {losses[0]:.4f} .. {losses[-1]:.4f}; norm {float(static_norm):.4f}")
    print(f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB\n")
    print("| mode | ms per step | vs eager |")
    print("|---|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {ms - rows[0][1]:+.1f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
