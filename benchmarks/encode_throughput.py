"""Encode throughput: Twinkle's Template / Dataset.encode against a plain apply_chat_template loop.

Encodes N short chat rows (the bundled self-cognition set, cycled; system + user + assistant)
with the bundled tiny Qwen2-style tokenizer, in one process, and prints rows/s and the ratio
to the loop a user would otherwise write::

    python benchmarks/encode_throughput.py            # 100k rows
    python benchmarks/encode_throughput.py --rows 20000 --num-proc 2

Methods:

* ``apply_chat_template loop (ids only)``: ``[tok.apply_chat_template(m, tokenize=True) for m in rows]``;
  no labels, the baseline.
* ``apply_chat_template loop + assistant mask``: the same with ``return_dict=True,
  return_assistant_tokens_mask=True``, i.e. what it takes to get labels by hand.
* ``Template.batch_encode``: Twinkle's encoder (labels included), batches of 1000 rows.
* ``Dataset.encode``: the full Arrow pipeline (read rows, encode, write input_ids/labels/length),
  one process and ``--num-proc`` worker processes.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()

    import datasets
    from twinkle import assets
    from twinkle.dataset import Dataset, DatasetMeta
    from twinkle.preprocessor import SelfCognitionProcessor
    from twinkle.template.base import Template

    datasets.disable_progress_bars()
    datasets.disable_caching()
    model_dir = str(assets.path("tiny-qwen2"))
    source = DatasetMeta(str(assets.path("datasets/self_cognition.jsonl")), data_slice=range(args.rows))
    prepared = Dataset(dataset_meta=source).map(SelfCognitionProcessor("twinkle大模型", "ModelScope社区"))
    trajectories = list(prepared.dataset)
    conversations = [t["messages"] for t in trajectories]
    template = Template(model_dir)
    tokenizer = template.tokenizer
    n = len(conversations)

    def baseline() -> None:
        for messages in conversations:
            tokenizer.apply_chat_template(messages, tokenize=True)

    def baseline_masks() -> None:
        for messages in conversations:
            tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)

    def batch_encode() -> None:
        for start in range(0, n, args.batch_size):
            template.batch_encode(trajectories[start : start + args.batch_size])

    def dataset_encode(num_proc: int | None) -> Callable[[], None]:
        def run() -> None:
            dataset = Dataset(dataset_meta=source).map(SelfCognitionProcessor("twinkle大模型", "ModelScope社区"))
            dataset.set_template(template)
            start = time.perf_counter()
            dataset.encode(num_proc=num_proc, batch_size=args.batch_size)
            run.elapsed = time.perf_counter() - start  # type: ignore[attr-defined]

        return run

    results: list[tuple[str, float, str]] = []
    results.append(("apply_chat_template loop (ids only)", timed(baseline), "no"))
    results.append(("apply_chat_template loop + assistant mask", timed(baseline_masks), "yes"))
    results.append((f"Template.batch_encode (batches of {args.batch_size})", timed(batch_encode), "yes"))
    for num_proc in (None, args.num_proc):
        if num_proc is not None and num_proc < 2:
            continue
        run = dataset_encode(num_proc)
        run()
        results.append((f"Dataset.encode (num_proc={num_proc or 1}, Arrow in/out)", run.elapsed, "yes"))  # type: ignore[attr-defined]

    base = n / results[0][1]
    print(f"\nencode throughput: {n} rows, tiny-qwen2 tokenizer, {os.cpu_count()} CPUs")
    print(f"{'method':<52} {'labels':>6} {'seconds':>8} {'rows/s':>9} {'vs loop':>8}")
    for name, seconds, labels in results:
        rate = n / seconds
        print(f"{name:<52} {labels:>6} {seconds:>8.2f} {rate:>9.0f} {rate / base:>7.2f}x")


if __name__ == "__main__":
    main()
