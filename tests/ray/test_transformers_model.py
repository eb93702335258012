"""The real TransformersModel and DataLoader in ray mode give the numbers of local mode.

Tiny Qwen2 (random weights from the bundled config, seeded), the bundled self-cognition
data, LoRA with gradient accumulation, AdamW: the same loop, first in one process, then
with the model on two CPU actors (dp=2, gloo) and the DataLoader in the driver or in its
own actors.
"""

from __future__ import annotations

import pytest
import twinkle
from twinkle import DeviceGroup, DeviceMesh

pytest.importorskip("transformers")
pytest.importorskip("peft")

SEED = 42
STEPS = 4
BATCH = 8


def make_dataset():
    from twinkle import assets
    from twinkle.dataset import Dataset, DatasetMeta
    from twinkle.preprocessor import SelfCognitionProcessor

    dataset = Dataset(
        dataset_meta=DatasetMeta(str(assets.path("datasets/self_cognition.jsonl")), data_slice=range(STEPS * BATCH))
    )
    dataset.set_template("Template", model_id=str(assets.path("tiny-qwen2")))
    dataset.map(SelfCognitionProcessor("twinkle大模型", "ModelScope社区"))
    dataset.encode()
    return dataset


def train(batches, remote_group=None):
    """The user's loop (as in the seed), identical in every mode; returns the per-step losses."""
    from peft import LoraConfig
    from twinkle import assets
    from twinkle.model import TransformersModel

    model = TransformersModel(model_id=str(assets.path("tiny-qwen2")), device="cpu", remote_group=remote_group)
    model.add_adapter_to_model(
        "default", LoraConfig(r=8, lora_alpha=32, target_modules="all-linear"), gradient_accumulation_steps=2
    )
    model.set_optimizer(optimizer_cls="AdamW", lr=1e-3)
    losses = []
    for batch in batches:
        out = model.forward_backward(inputs=batch)
        model.clip_grad_and_step()
        losses.append(out["loss"])
    metric = model.calculate_metric(is_training=True)
    return losses, metric, model


@pytest.fixture(scope="module")
def local_reference():
    from twinkle.dataloader import DataLoader

    with twinkle.initialize(mode="local", seed=SEED):
        dataset = make_dataset()
        batches = list(DataLoader(dataset=dataset, batch_size=BATCH, min_batch_size=BATCH))
        losses, metric, _ = train(batches)
    return dataset, batches, losses, metric


@pytest.fixture(scope="module")
def ray_dp2(ray_cluster):
    runtime = twinkle.initialize(
        mode="ray",
        groups=[DeviceGroup(name="default", ranks=2, device_type="cpu")],
        global_device_mesh=DeviceMesh.from_sizes(dp_size=2),
        seed=SEED,
    )
    yield runtime
    runtime.shutdown()


def test_sft_dp2_on_two_actors_matches_local(local_reference, ray_dp2):
    """The seed's loop on two model actors. The first half of the batches come from a DataLoader
    in the driver (as in the seed); the second half from a DataLoader living in two actors of
    its own, as references the model's actors fetch directly (never through the driver)."""
    import twinkle_ray
    from twinkle.dataloader import DataLoader

    dataset, batches, expected, expected_metric = local_reference
    driver_loader = DataLoader(dataset=dataset, batch_size=BATCH, min_batch_size=BATCH)
    assert list(driver_loader) == batches
    actor_loader = DataLoader(dataset=dataset, batch_size=BATCH, min_batch_size=BATCH, remote_group="default")
    assert len(twinkle_ray.remote_component(actor_loader).actors) == 2  # one per data rank of the global mesh
    assert len(actor_loader) == STEPS
    assert list(actor_loader) == batches  # a plain for loop gets the global batches
    refs = list(actor_loader.__iter__.remote())
    assert all(isinstance(ref, twinkle_ray.RemoteResult) for ref in refs)
    half = STEPS // 2
    losses, metric, model = train(batches[:half] + refs[half:], remote_group="default")
    assert losses == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert losses[-1] != losses[0]  # it trained
    assert metric["loss"] == pytest.approx(expected_metric["loss"], rel=1e-4)
    assert len(twinkle_ray.remote_component(model).actors) == 2
