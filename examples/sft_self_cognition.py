"""Self-cognition SFT: the seed's example (docs/spec.md) on an embedded default.

The structure and API calls are the seed's; only the ids and the training strength
changed. By default it builds a tiny random-init Qwen2 from the bundled config and
tokenizer and trains a LoRA on the bundled self-cognition data set, on CPU, in a couple
of minutes. A random-init model learns slowly at the seed's lr=1e-4 with r=8, so the
embedded default uses a larger rank, lr 2e-3 and several passes over the data
(``data_slice`` oversamples). Afterwards it asks "who are you?" and prints the answer.

    python examples/sft_self_cognition.py
    python examples/sft_self_cognition.py --packing 512   # sequences packed into 512-token rows, no padding
    python examples/sft_self_cognition.py --model-id ms://Qwen/Qwen2.5-0.5B-Instruct --lr 1e-4 --rows 1000
    TWINKLE_MODEL_ID=hf://Qwen/Qwen2.5-0.5B-Instruct python examples/sft_self_cognition.py
"""

from __future__ import annotations

import argparse
import os

import twinkle
from peft import LoraConfig
from twinkle import DeviceGroup, assets
from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta, PackingDataset
from twinkle.model import TransformersModel
from twinkle.preprocessor import SelfCognitionProcessor
from twinkle.progress import progress

NAME, AUTHOR = "twinkle大模型", "ModelScope社区"
SYSTEM = "You are a helpful assistant."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", default=os.environ.get("TWINKLE_MODEL_ID", str(assets.path("tiny-qwen2"))))
    parser.add_argument(
        "--dataset-id",
        default=os.environ.get("TWINKLE_DATASET_ID", str(assets.path("datasets/self_cognition.jsonl"))),
    )
    parser.add_argument("--rows", type=int, default=1200, help="rows to train on (oversamples the 150 bundled rows)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument(
        "--packing",
        type=int,
        default=0,
        help="pack the conversations into rows of this many tokens and train padding-free (0: padded batches)",
    )
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--output", default="last-checkpoint")
    return parser.parse_args(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def train(args: argparse.Namespace) -> dict:
    """Train, save, ask "who are you?"; returns the first/last loss and the answer."""
    device_group = [DeviceGroup(name="default", ranks=1, device_type=args.device)]
    twinkle.initialize(mode="local", groups=device_group, seed=42)

    meta = DatasetMeta(args.dataset_id, data_slice=range(args.rows))
    # Packed: PackingDataset bin-packs the encoded conversations into rows of up to --packing tokens
    dataset = (
        PackingDataset(dataset_meta=meta, packing_length=args.packing) if args.packing else Dataset(dataset_meta=meta)
    )
    # Set template to prepare encoding
    dataset.set_template("Template", model_id=args.model_id)
    # Preprocess the dataset to standard format
    dataset.map(SelfCognitionProcessor(NAME, AUTHOR))
    # Encode dataset
    dataset.encode()
    batch_size = 1 if args.packing else 8  # a packed row holds about as many tokens as 8 padded conversations
    dataloader = DataLoader(dataset=dataset, batch_size=batch_size, min_batch_size=batch_size, shuffle=True)
    model = TransformersModel(model_id=args.model_id, remote_group="default")
    if args.packing:
        # one row per batch, no padding; each conversation attends to itself only (VarlenAttention)
        model.set_processor("PaddingFreeProcessor")

    lora_config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
    # Add a lora to model, with name `default`
    model.add_adapter_to_model("default", lora_config, gradient_accumulation_steps=2)
    # Add Optimizer for lora `default`
    model.set_optimizer(optimizer_cls="AdamW", lr=args.lr)
    # Add LRScheduler for lora `default`
    model.set_lr_scheduler(
        scheduler_cls="CosineWarmupScheduler", num_warmup_steps=5, num_training_steps=len(dataloader) // 2
    )
    losses = []
    # a bar with rate and ETA on a terminal, silent when the output is not one (logs, CI)
    bar = progress(dataloader, desc="sft", unit="batch")
    for step, batch in enumerate(bar):
        # Do forward and backward
        losses.append(model.forward_backward(inputs=batch).loss)
        # Step
        model.clip_grad_and_step()
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % 2 == 1:
            # metrics since the last call, every optimizer step (2 batches), to the trackers (metrics.jsonl);
            # optimizer_step counts optimizer steps, micro_batches the batches
            metric = model.calculate_metric(is_training=True)
            if step % 20 == 1:
                bar.write(f"batch {step + 1} of {len(dataloader)}, metric: {metric}")
    model.save(args.output)

    model.set_template("Template", model_id=args.model_id)
    question = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "who are you?"}]
    answer = model.generate([question], max_new_tokens=48)[0]
    print(f"loss: {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f} (mean of the last 10 batches)")
    print(f"Q: who are you?\nA: {answer}")
    twinkle.shutdown()
    return {"first_loss": losses[0], "last_loss": sum(losses[-10:]) / 10, "answer": answer}


if __name__ == "__main__":
    train(parse_args())
