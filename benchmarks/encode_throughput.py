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

The methods take turns on chunks of ``--chunk`` rows, so load from other processes on a
shared machine affects them alike; the ratios are the figure to read.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=20_000, help="rows per turn of each method")
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

    # The methods take turns on chunks of rows (A B C D E, A B C D E, ...), so a change in
    # machine load during the run hits all of them alike.
    def baseline(rows: range) -> float:
        start = time.perf_counter()
        for i in rows:
            tokenizer.apply_chat_template(conversations[i], tokenize=True)
        return time.perf_counter() - start

    def baseline_masks(rows: range) -> float:
        start = time.perf_counter()
        for i in rows:
            tokenizer.apply_chat_template(
                conversations[i], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
        return time.perf_counter() - start

    def batch_encode(rows: range) -> float:
        start = time.perf_counter()
        for first in range(rows.start, rows.stop, args.batch_size):
            template.batch_encode(trajectories[first : min(first + args.batch_size, rows.stop)])
        return time.perf_counter() - start

    def dataset_encode(num_proc: int | None) -> Callable[[range], float]:
        def run(rows: range) -> float:
            meta = DatasetMeta(source.dataset_id, data_slice=range(rows.start, rows.stop))
            dataset = Dataset(dataset_meta=meta).map(SelfCognitionProcessor("twinkle大模型", "ModelScope社区"))
            dataset.set_template(template)
            start = time.perf_counter()
            dataset.encode(num_proc=num_proc, batch_size=args.batch_size)
            return time.perf_counter() - start

        return run

    methods: list[tuple[str, str, Callable[[range], float]]] = [
        ("apply_chat_template loop (ids only)", "no", baseline),
        ("apply_chat_template loop + assistant mask", "yes", baseline_masks),
        (f"Template.batch_encode (batches of {args.batch_size})", "yes", batch_encode),
        ("Dataset.encode (num_proc=1, Arrow in/out)", "yes", dataset_encode(None)),
    ]
    if args.num_proc >= 2:
        methods.append(
            (f"Dataset.encode (num_proc={args.num_proc}, Arrow in/out)", "yes", dataset_encode(args.num_proc))
        )
    seconds = [0.0] * len(methods)
    for first in range(0, n, args.chunk):
        rows = range(first, min(first + args.chunk, n))
        for k, (_, _, method) in enumerate(methods):
            seconds[k] += method(rows)
    results = [(name, s, labels) for (name, labels, _), s in zip(methods, seconds)]

    base = n / results[0][1]
    print(f"\nencode throughput: {n} rows, tiny-qwen2 tokenizer, {os.cpu_count()} CPUs")
    print(f"{'method':<52} {'labels':>6} {'seconds':>8} {'rows/s':>9} {'vs loop':>8}")
    for name, seconds, labels in results:
        rate = n / seconds
        print(f"{name:<52} {labels:>6} {seconds:>8.2f} {rate:>9.0f} {rate / base:>7.2f}x")


if __name__ == "__main__":
    main()
