"""Checkpoint TTLs through the official SDK: expiry shown in listings, expired checkpoints deleted, rolling saves."""

from __future__ import annotations

import time
import uuid
from datetime import timezone

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402
from twinkle_server import checkpoints as ckpt  # noqa: E402

BASE = "twinkle/tiny-qwen2"


@pytest.fixture(scope="module")
def tenant(server):
    key = server.add_tenant(f"ttl-{uuid.uuid4().hex[:6]}", max_adapters=20)
    client = tinker.ServiceClient(base_url=server.url, api_key=key)
    yield client, tinker.RestClient(base_url=server.url, api_key=key), server.state.store.tenant_for_key(key)
    client.close(status="success")


def _step(tc, tokens) -> None:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.array(tokens[1:]), "weights": np.ones(len(tokens) - 1)},
    )
    tc.forward_backward([datum], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()


def _expiry(checkpoint) -> float:
    return checkpoint.expires_at.replace(tzinfo=checkpoint.expires_at.tzinfo or timezone.utc).timestamp()


def test_ttl_is_listed_and_expired_checkpoints_are_deleted(server, tenant, tiny_tokenizer) -> None:
    service, rest, owner = tenant
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    tokens = tiny_tokenizer.encode("A checkpoint that expires. " * 2)
    _step(tc, tokens)
    before = time.time()
    rolling = tc.save_state("rolling", ttl_seconds=7200).result().path
    sampler = tc.save_weights_for_sampler("rolling-sampler", ttl_seconds=3600).result().path
    kept = tc.save_state("kept").result().path
    listed = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert set(listed) == {rolling, sampler, kept}
    # the expiry is the save time plus the TTL (the save happened between `before` and now)
    assert before + 7200 - 1 <= _expiry(listed[rolling]) <= time.time() + 7200 + 1
    assert before + 3600 - 1 <= _expiry(listed[sampler]) <= time.time() + 3600 + 1
    assert listed[kept].expires_at is None
    assert rest.get_training_run(tc.model_id).result().last_checkpoint.expires_at is None  # "kept" is the last

    # a rolling save overwrites its name; its TTL restarts
    _step(tc, tokens)
    assert tc.save_state("rolling", ttl_seconds=7200, overwrite=True).result().path == rolling
    # TTLs out of Tinker's range are refused, and the range's ends are accepted
    rest.set_checkpoint_ttl_from_tinker_path(kept, 3600).result()
    with pytest.raises(Exception, match="ttl_seconds must be between"):
        rest.set_checkpoint_ttl_from_tinker_path(kept, 60).result()
    rest.set_checkpoint_ttl_from_tinker_path(kept, None).result()  # removed again
    listed = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert listed[kept].expires_at is None

    # time passes (the store's clock is epoch seconds): the rolling checkpoint and sampler expire
    state = server.state
    files = state.checkpoint_files(owner, ckpt.parse_tinker_path(rolling))
    assert files.exists()
    assert state.expire_checkpoints(now=time.time() + 7300) == 2
    assert not files.exists()
    assert [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == [kept]
    with pytest.raises(Exception, match="not found"):
        service.create_training_client_from_state(rolling).result()
    with pytest.raises(Exception, match="not found"):
        service.create_sampling_client(model_path=sampler).result()
    # the unexpired one still loads
    assert service.create_training_client_from_state(kept).result().model_id


def test_ttl_out_of_range_is_refused_on_save(tenant, tiny_tokenizer) -> None:
    service, _, _ = tenant
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    with pytest.raises(Exception, match="ttl_seconds must be between"):
        tc.save_state("too-short", ttl_seconds=10).result()
