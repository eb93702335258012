"""One base model per server: the Tinker engine and the twinkle API's model share its weights."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
pytest.importorskip("peft")
from tinker import types  # noqa: E402

BASE = "twinkle/tiny-qwen2"


def _storages(tensors) -> dict[int, int]:
    """data_ptr -> bytes of each distinct storage."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def test_tinker_and_twinkle_apis_hold_one_set_of_base_weights(server) -> None:
    import twinkle
    from peft import LoraConfig
    from twinkle.client.session import ServerError
    from twinkle.model import TransformersModel
    from twinkle_server.twinkle_host import host

    engine = server.state.engine
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(list(range(5, 25))),
            loss_fn_inputs={"target_tokens": np.array(list(range(6, 26)))},
        )
    ]
    service = tinker.ServiceClient(base_url=server.url, api_key=server.add_tenant(f"shared-t-{uuid.uuid4().hex[:6]}"))
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    before = tc.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()

    with twinkle.initialize(
        mode="http", base_url=server.url, api_key=server.add_tenant(f"shared-w-{uuid.uuid4().hex[:6]}")
    ):
        model = TransformersModel(model_id=server.state.config.model_name)
        model.add_adapter_to_model("mine", LoraConfig(r=4, lora_alpha=32, target_modules="all-linear"))
        model.set_optimizer("AdamW", lr=1e-2)
        rows = [{"input_ids": list(range(7 + i, 27 + i))} for i in range(4)]
        for _ in range(2):  # the twinkle tenant trains its adapter on the shared base
            model.forward_backward(inputs=rows)
            model.clip_grad_and_step()
        with pytest.raises(ServerError, match="would train the shared base"):
            model.add_adapter_to_model("biased", LoraConfig(r=4, target_modules="all-linear", bias="all"))

    hosted = host(server.state).model.model  # the twinkle API's model (a peft model now)
    base_of_hosted = [p for name, p in hosted.named_parameters(remove_duplicate=False) if "lora_" not in name]
    engine_storages = _storages(engine.base_parameters.values())
    hosted_storages = _storages(base_of_hosted)
    # every base weight of the twinkle API model is one of the engine's tensors: one set per process
    assert set(hosted_storages) <= set(engine_storages), set(hosted_storages) - set(engine_storages)
    assert len(base_of_hosted) == len(engine.base_parameters)
    embed = hosted.get_base_model().get_submodule("model.embed_tokens").weight
    assert embed is engine.base_parameters["model.embed_tokens.weight"]
    both = _storages([*engine.base_parameters.values(), *base_of_hosted])
    assert sum(both.values()) == sum(engine_storages.values())
    # the shared base stayed frozen
    assert engine.trainable_base_weights() == []

    # the twinkle tenant's training changed nothing for the Tinker tenant (its adapter is still zero-B)
    after = tc.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(before, after, rtol=0, atol=1e-6)
    service.close(status="success")
