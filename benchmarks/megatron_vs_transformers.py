"""Training tokens/s of MegatronModel against TransformersModel, side by side in one process (GPU).

Shapes: Qwen2.5-0.5B and Qwen2.5-7B (their published configurations, random bf16 weights
built on the GPU and saved once to a temp directory that both backends load). Modes: LoRA
(r=16, all linear projections) and full-parameter training. Backends:

* ``transformers``: TransformersModel (sdpa attention), torch AdamW — the baseline a user
  would otherwise use;
* ``megatron``: MegatronModel, torch AdamW over the megatron parameters;
* ``megatron+mopt``: MegatronModel with megatron-core's optimizer and DDP grad buffers
  (``use_megatron_optimizer=True``; full mode on 0.5B only: fp32 main parameters and Adam
  state of 7B do not fit beside the bf16 model).

Every run does ``--warmup`` untimed steps, then ``--steps`` timed steps of
``forward_backward`` + ``clip_grad_and_step`` on a fixed random batch (all tokens
trained), synchronizing CUDA before reading the clock. Prints a table with the ratio of
each backend to ``transformers`` for the same shape and mode.

    python benchmarks/megatron_vs_transformers.py --shapes 0.5b --modes lora,full
    python benchmarks/megatron_vs_transformers.py --shapes 7b --modes lora --batch-size 4
    python benchmarks/megatron_vs_transformers.py --shapes tiny --device cpu --seq-len 32 --steps 2  # smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

from model_shapes import QWEN25_05B, QWEN25_7B, qwen2_config

#: the published shapes, and a smoke-test shape (runs on CPU with --device cpu)
SHAPES = {
    "0.5b": QWEN25_05B,
    "7b": QWEN25_7B,
    "tiny": dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=True,
    ),
}
DEFAULT_BATCH = {"0.5b": 8, "7b": 4, "tiny": 2}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def build_checkpoint(shape: str, directory: Path, device: str = "cuda") -> Path:
    """Random bf16 weights of ``shape`` built on ``device``, saved as a transformers checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    data = qwen2_config(SHAPES[shape])
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    path = directory / f"qwen2.5-{shape}"
    model.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def make_batch(vocab: int, batch_size: int, seq_len: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(batch_size):
        ids = torch.randint(10, vocab - 10, (seq_len,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def run_one(
    backend: str, mode: str, path: Path, rows: list[dict], steps: int, warmup: int, device: str = "cuda"
) -> dict:
    """tokens/s and peak memory of one backend; ``error`` instead when it fails (e.g. out of memory)."""
    import torch
    from peft import LoraConfig
    from twinkle.model.transformers_model import TransformersModel

    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = None
    try:
        if backend == "transformers":
            model = TransformersModel(model_id=str(path), torch_dtype="bfloat16", device=device)
        else:
            from twinkle_megatron.model import MegatronModel

            model = MegatronModel(model_id=str(path), torch_dtype="bfloat16", device=device)
        if mode == "lora":
            model.add_adapter_to_model("default", LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        extra = {"use_megatron_optimizer": True} if backend == "megatron+mopt" else {}
        model.set_optimizer("AdamW", lr=1e-5, weight_decay=0.0, **extra)
        losses = []
        for _ in range(warmup):
            losses.append(model.forward_backward(inputs=rows).loss)
            model.clip_grad_and_step(max_grad_norm=1.0)
        _sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            losses.append(model.forward_backward(inputs=rows).loss)
            model.clip_grad_and_step(max_grad_norm=1.0)
        _sync(device)
        elapsed = time.perf_counter() - started
        tokens = steps * sum(len(r["input_ids"]) for r in rows)
        return {
            "tokens_per_s": tokens / elapsed,
            "step_s": elapsed / steps,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
            "first_loss": losses[0],
            "last_loss": losses[-1],
        }
    except torch.OutOfMemoryError as exc:
        return {"error": f"out of memory: {str(exc).splitlines()[0][:120]}"}
    finally:
        if model is not None and hasattr(model, "close"):
            model.close()
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="0.5b", help="comma list of 0.5b,7b")
    parser.add_argument("--modes", default="lora,full", help="comma list of lora,full")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (default: 8 for 0.5b, 4 for 7b)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run of --shapes tiny)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("megatron_vs_transformers: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    results = []
    with tempfile.TemporaryDirectory(prefix="twinkle-megatron-bench-") as tmp:
        for shape in args.shapes.split(","):
            path = build_checkpoint(shape, Path(tmp), args.device)
            batch_size = args.batch_size or DEFAULT_BATCH[shape]
            rows = make_batch(SHAPES[shape]["vocab_size"], batch_size, args.seq_len)
            for mode in args.modes.split(","):
                backends = ["transformers", "megatron"]
                if args.device == "cuda" and not (shape == "7b" and mode == "full"):
                    backends.append("megatron+mopt")
                for backend in backends:
                    result = run_one(backend, mode, path, rows, args.steps, args.warmup, args.device)
                    result.update(shape=shape, mode=mode, backend=backend, batch=batch_size, seq_len=args.seq_len)
                    results.append(result)
                    print(json.dumps(result), flush=True)
    header = (
        f"{'shape':<6}{'mode':<6}{'backend':<16}{'tokens/s':>12}{'vs transformers':>17}{'step s':>9}{'peak GiB':>10}"
    )
    print("\n" + header)
    print("-" * len(header))
    for r in results:
        base = next(
            (
                b
                for b in results
                if b["shape"] == r["shape"] and b["mode"] == r["mode"] and b["backend"] == "transformers"
            ),
            None,
        )
        if "error" in r:
            print(f"{r['shape']:<6}{r['mode']:<6}{r['backend']:<16}  {r['error']}")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base and "tokens_per_s" in base else float("nan")
        print(
            f"{r['shape']:<6}{r['mode']:<6}{r['backend']:<16}{r['tokens_per_s']:>12.0f}{ratio:>16.2f}x"
            f"{r['step_s']:>9.3f}{r['peak_gib']:>10.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
