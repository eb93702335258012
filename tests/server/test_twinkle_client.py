"""http mode: the seed's SFT loop runs against `twinkle serve`, changing only initialize()."""

from __future__ import annotations

import math
import uuid

import pytest

pytest.importorskip("peft")


def sft_loop(model_id: str, steps: int) -> tuple[list[float], dict, str]:
    """The seed's SFT loop, verbatim apart from the model id, data size and step count."""
    from peft import LoraConfig
    from twinkle import assets
    from twinkle.dataloader import DataLoader
    from twinkle.dataset import Dataset, DatasetMeta
    from twinkle.model import TransformersModel
    from twinkle.preprocessor import SelfCognitionProcessor

    dataset = Dataset(dataset_meta=DatasetMeta(str(assets.path("datasets/self_cognition.jsonl")), data_slice=range(32)))
    dataset.set_template("Template", model_id=str(assets.path("tiny-qwen2")))
    dataset.map(SelfCognitionProcessor("twinkle大模型", "ModelScope社区"))
    dataset.encode()
    dataloader = DataLoader(dataset=dataset, batch_size=8, min_batch_size=8)
    model = TransformersModel(model_id=model_id, remote_group="default")
    lora_config = LoraConfig(r=8, lora_alpha=32, target_modules="all-linear")
    model.add_adapter_to_model("default", lora_config, gradient_accumulation_steps=1)
    model.set_optimizer(optimizer_cls="AdamW", lr=3e-3)
    model.set_lr_scheduler(scheduler_cls="CosineWarmupScheduler", num_warmup_steps=1, num_training_steps=steps)
    losses = []
    for _epoch in range(steps // len(dataloader) + 1):
        for batch in dataloader:
            if len(losses) == steps:
                break
            out = model.forward_backward(inputs=batch)
            losses.append(float(out.loss))
            model.clip_grad_and_step()
    metric = model.calculate_metric(is_training=True)
    saved = model.save("last-checkpoint")
    return losses, metric, saved


def test_sft_loop_over_http(server) -> None:
    import twinkle
    from twinkle.model import TransformersModel

    key = server.add_tenant(f"sft-{uuid.uuid4().hex[:6]}")
    runtime = twinkle.initialize(mode="http", base_url=server.url, api_key=key)
    try:
        losses, metric, saved = sft_loop(server.state.config.model_name, steps=8)
        assert all(math.isfinite(x) for x in losses)
        assert sum(losses[-2:]) < sum(losses[:2]), losses
        assert isinstance(metric, dict) and metric
        assert saved == "last-checkpoint"
        model = TransformersModel(model_id=server.state.config.model_name)
        assert type(model).__name__ == "RemoteComponent"
        model.load("last-checkpoint")  # the tenant's own checkpoint, by name
        with pytest.raises(Exception, match="not allowed"):
            model.save("../escape")
        with pytest.raises(AttributeError, match="not available in http mode"):
            model.state_of  # noqa: B018
    finally:
        runtime.shutdown()


def test_http_mode_full_training_is_private_and_checkpoints_isolated(server) -> None:
    import twinkle
    from twinkle.client.session import ServerError
    from twinkle.model import TransformersModel

    key_a = server.add_tenant(f"iso-a-{uuid.uuid4().hex[:6]}")
    key_b = server.add_tenant(f"iso-b-{uuid.uuid4().hex[:6]}")
    with twinkle.initialize(mode="http", base_url=server.url, api_key=key_a):
        full = TransformersModel(model_id=server.state.config.model_name)
        full.set_optimizer("AdamW", lr=1e-3)  # full-parameter training: the tenant's one private copy of the base
        model = TransformersModel(model_id=server.state.config.model_name)
        with pytest.raises(ServerError, match="add a LoRA adapter first"):
            model.set_optimizer("AdamW", lr=1e-3)  # the shared base is never trained
        from peft import LoraConfig

        model.add_adapter_to_model("mine", LoraConfig(r=4, target_modules="all-linear"))
        model.save("a-private")
    with twinkle.initialize(mode="http", base_url=server.url, api_key=key_b):
        other = TransformersModel(model_id=server.state.config.model_name)
        with pytest.raises(ServerError, match="no checkpoint named"):
            other.load("a-private")
        with pytest.raises(ServerError, match="hosts"):
            TransformersModel(model_id="Qwen/Qwen2.5-7B-Instruct")
    with pytest.raises(Exception, match="401|invalid API key"):
        twinkle.initialize(mode="http", base_url=server.url, api_key="tml-wrong")
