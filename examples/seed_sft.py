"""The seed's usage example (docs/spec.md), verbatim except for the ids and the run mode.

Changed: the model and data set ids point at the bundled tiny Qwen2 directory and the
bundled self-cognition data set; mode='local' on one CPU process (no mesh). Everything
else is the seed's code. Set TWINKLE_MODEL_ID / TWINKLE_DATASET_ID to real ids on a GPU
machine, and TWINKLE_SEED_ROWS to shorten the run (tests use 64).

    python examples/seed_sft.py
"""

import os

import twinkle
from peft import LoraConfig
from twinkle import DeviceGroup, assets
from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.model import TransformersModel
from twinkle.preprocessor import SelfCognitionProcessor

MODEL_ID = os.environ.get("TWINKLE_MODEL_ID", str(assets.path("tiny-qwen2")))
DATASET_ID = os.environ.get("TWINKLE_DATASET_ID", str(assets.path("datasets/self_cognition.jsonl")))
ROWS = int(os.environ.get("TWINKLE_SEED_ROWS", "1000"))

device_group = [DeviceGroup(name="default", ranks=1, device_type="cpu")]
# local for torchrun
twinkle.initialize(mode="local", groups=device_group)


def train():
    # 1000 samples
    dataset = Dataset(dataset_meta=DatasetMeta(DATASET_ID, data_slice=range(ROWS)))
    # Set template to prepare encoding
    dataset.set_template("Template", model_id=MODEL_ID)
    # Preprocess the dataset to standard format
    dataset.map(SelfCognitionProcessor("twinkle大模型", "ModelScope社区"))
    # Encode dataset
    dataset.encode()
    # Global batch size = 8, for GPUs, so 1 sample per GPU
    dataloader = DataLoader(dataset=dataset, batch_size=8, min_batch_size=8)
    # Use a TransformersModel
    model = TransformersModel(model_id=MODEL_ID, remote_group="default")

    lora_config = LoraConfig(r=8, lora_alpha=32, target_modules="all-linear")

    # Add a lora to model, with name `default`
    # Comment this to use full-parameter training
    model.add_adapter_to_model("default", lora_config, gradient_accumulation_steps=2)
    # Add Optimizer for lora `default`
    model.set_optimizer(optimizer_cls="AdamW", lr=1e-4)
    # Add LRScheduler for lora `default`
    model.set_lr_scheduler(
        scheduler_cls="CosineWarmupScheduler", num_warmup_steps=5, num_training_steps=len(dataloader)
    )
    for step, batch in enumerate(dataloader):
        # Do forward and backward
        model.forward_backward(inputs=batch)
        # Step
        model.clip_grad_and_step()
        if step % 20 == 0:
            # Print metric
            metric = model.calculate_metric(is_training=True)
            print(f"Current is step {step} of {len(dataloader)}, metric: {metric}")
    model.save("last-checkpoint")


if __name__ == "__main__":
    train()
