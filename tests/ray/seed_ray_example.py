"""The seed's Ray example (docs/spec.md), verbatim except for what CPU CI needs.

Changed: ``device_type='cpu'`` instead of ``'cuda'``; the model and data set ids point at
the bundled tiny Qwen2 directory and self-cognition data (set TWINKLE_MODEL_ID /
TWINKLE_DATASET_ID to real ids on a GPU cluster); TWINKLE_SEED_ROWS shortens the run
(tests use 8) and TWINKLE_CHECKPOINT_DIR says where ``save`` writes. Everything else,
the 8 ranks, the fsdp=4 x dp=2 mesh and the loop, is the seed's code.

    python tests/ray/seed_ray_example.py
"""

import os

import twinkle
from peft import LoraConfig
from twinkle import DeviceGroup, DeviceMesh, assets
from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.model import TransformersModel
from twinkle.preprocessor import SelfCognitionProcessor

MODEL_ID = os.environ.get("TWINKLE_MODEL_ID", str(assets.path("tiny-qwen2")))
DATASET_ID = os.environ.get("TWINKLE_DATASET_ID", str(assets.path("datasets/self_cognition.jsonl")))
ROWS = int(os.environ.get("TWINKLE_SEED_ROWS", "1000"))
CHECKPOINT = os.environ.get("TWINKLE_CHECKPOINT_DIR", "last-checkpoint")

device_group = [DeviceGroup(name="default", ranks=8, device_type="cpu")]
device_mesh = DeviceMesh.from_sizes(fsdp_size=4, dp_size=2)
# local for torchrun
twinkle.initialize(mode="ray", groups=device_group, global_device_mesh=device_mesh)


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
    model.save(CHECKPOINT)


if __name__ == "__main__":
    train()
