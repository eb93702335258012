"""The adapter pool over HTTP (issues 30.3, 31.6, 32.6): adapters paged beyond the device slots, a full
pool answered at the create call, idle runs unloaded and reloaded on use, capacity reported."""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

pytest.importorskip("tinker")

BASE = "twinkle/tiny-qwen2"
PROTO = {"Content-Type": "application/x-protobuf"}
IDLE_S = 1.5


def _key(server, prefix: str, **quotas: Any) -> str:
    return server.add_tenant(f"{prefix}-{uuid.uuid4().hex[:6]}", **quotas)


def _http(server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=120)


def _wait(http: httpx.Client, request_id: str, tries: int = 120) -> dict:
    for _ in range(tries):
        body = http.post("/api/v1/retrieve_future", json={"request_id": request_id})
        assert body.status_code == 200, body.text
        if "protobuf" in body.headers.get("content-type", ""):  # a forward_backward result
            return {"protobuf": body.content}
        data = body.json()
        if data.get("type") != "try_again":
            return data
    raise AssertionError("future never finished")


def _create(http: httpx.Client, seq: int = 0, rank: int = 4) -> httpx.Response:
    sid = http.post("/api/v1/create_session", json={"tags": [], "sdk_version": "t"}).json()["session_id"]
    return http.post(
        "/api/v1/create_model",
        json={"session_id": sid, "model_seq_id": seq, "base_model": BASE, "lora_config": {"rank": rank}},
    )


def _run(http: httpx.Client, seq: int = 0) -> str:
    fut = _create(http, seq)
    assert fut.status_code == 200, fut.text
    assert "model_id" in _wait(http, fut.json()["request_id"])
    return fut.json()["model_id"]


def _fb_body(model_id: str, seq_id: int) -> bytes:
    from tinker.proto import tinker_public_pb2 as pb

    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = np.asarray([5, 6, 7, 8, 9], dtype=np.int32).tobytes()
    for name, values, dtype in (("target_tokens", [6, 7, 8, 9, 10], pb.DTYPE_INT64), ("weights", [1.0] * 5, None)):
        tensor = datum.loss_fn_inputs[name]
        arr = np.asarray(values, dtype=np.int64 if dtype is not None else np.float32)
        tensor.dtype = dtype if dtype is not None else pb.DTYPE_FLOAT32
        tensor.shape.extend(arr.shape)
        tensor.dense = arr.tobytes()
    return msg.SerializeToString()


def _train_step(http: httpx.Client, model_id: str, seq: int) -> int:
    """One forward_backward + optim_step (seq ids ``seq`` and ``seq + 1``); returns the next seq id."""
    fb = http.post("/api/v1/forward_backward", content=_fb_body(model_id, seq), headers=PROTO)
    assert fb.status_code == 200, fb.text
    assert "error" not in _wait(http, fb.json()["request_id"])
    step = http.post(
        "/api/v1/optim_step", json={"model_id": model_id, "seq_id": seq + 1, "adam_params": {"learning_rate": 1e-2}}
    )
    assert step.status_code == 200, step.text
    result = _wait(http, step.json()["request_id"])
    assert "error" not in result, result
    return seq + 2


def _save(http: httpx.Client, model_id: str, name: str, seq: int) -> str:
    fut = http.post("/api/v1/save_weights", json={"model_id": model_id, "path": name, "seq_id": seq})
    assert fut.status_code == 200, fut.text
    result = _wait(http, fut.json()["request_id"])
    assert "path" in result, result
    return result["path"]


def _checkpoint_tensors(server, key: str, model_id: str, name: str) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file
    from twinkle_server import checkpoints as ckpt

    tenant = server.state.store.tenant_for_key(key)
    directory = ckpt.checkpoint_dir(server.state.config.checkpoint_root, tenant.id, model_id, "training", name)
    tensors = dict(load_file(str(directory / "adapter_model.safetensors")))
    optim = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=False)
    for i, per_param in optim["state"].items():
        for k, v in per_param.items():
            if torch.is_tensor(v):
                tensors[f"optim/{i}/{k}"] = v
    return tensors


def _wait_until(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


@pytest.fixture(scope="module")
def pool_server(tmp_path_factory, server_factory) -> Iterator[Any]:
    """A server with 2 device slots, 8 live adapters at most and runs idle after 1.5 s."""
    from twinkle_server.config import ServerConfig

    config = ServerConfig(
        state_dir=tmp_path_factory.mktemp("pool"),
        max_adapters=8,
        device_slots=2,
        adapter_host_bytes=1 << 30,
        max_rank=8,
        long_poll_s=1.0,
        run_idle_s=IDLE_S,
        device="cpu",
    )
    running = server_factory(config)
    from twinkle_server.adapter_pool import NoAdapterPool

    if isinstance(running.state.pool, NoAdapterPool):
        running.stop()
        pytest.skip("this server's engine has no adapter pool (LoRAEngine before the one-engine change)")
    yield running
    running.stop()


def _one_adapter_bytes(server) -> int:
    from twinkle_server.engine import ALL_TARGETS

    return server.state.engine.adapter_bytes(4, ALL_TARGETS)


def test_adapters_beyond_the_device_slots_are_paged_and_all_train(pool_server) -> None:
    http_clients = [_http(pool_server, _key(pool_server, f"page{i}")) for i in range(3)]
    try:
        runs = [_run(http) for http in http_clients]
        cap = pool_server.state.engine.capacity()
        assert cap["slots"] == 2 and cap["resident"] <= 2 and cap["resident"] + cap["paged"] >= 3
        seqs = [1, 1, 1]
        for _ in range(2):  # round-robin: every step pages a run in and another out
            for i, (http, run) in enumerate(zip(http_clients, runs)):
                seqs[i] = _train_step(http, run, seqs[i])
        assert pool_server.state.engine.pool.stats["page_ins"] >= 3
        for http, run in zip(http_clients, runs):
            assert http.post("/api/v1/unload_model", json={"model_id": run}).status_code == 200
    finally:
        for http in http_clients:
            http.close()


def test_a_full_pool_is_a_503_with_retry_after_at_create(pool_server) -> None:
    engine = pool_server.state.engine
    _wait_until(lambda: engine.capacity()["resident"] + engine.capacity()["paged"] == 0)
    one = _one_adapter_bytes(pool_server)
    budget = engine.pool.host_bytes_budget
    engine.pool.host_bytes_budget = 2 * one + one // 2  # room for two rank-4 adapters
    try:
        keys = [_key(pool_server, f"full{i}") for i in range(3)]
        with _http(pool_server, keys[0]) as a, _http(pool_server, keys[1]) as b, _http(pool_server, keys[2]) as c:
            first, second = _run(a), _run(b)
            full = _create(c)  # answered by the create call itself, not by a future that fails later
            assert full.status_code == 503, full.text
            detail = full.json()["detail"]
            assert "host-memory budget" in detail and "--adapter-host-gb" in detail, detail
            assert 1 <= int(full.headers["Retry-After"]) <= IDLE_S + 1
            bigger = _create(c, 1, rank=8)
            assert bigger.status_code == 503
            # the twinkle API's create call for an adapter is answered the same way
            from twinkle.client.codec import encode

            create = {"kind": "model", "cls": "TransformersModel", "kwargs": {"model_id": BASE}}
            object_id = c.post("/twinkle/v1/objects", json=create).json()["object_id"]
            add = {"method": "add_adapter_to_model", "args": encode(["a", {"r": 4, "target_modules": "all-linear"}])}
            refused = c.post(f"/twinkle/v1/objects/{object_id}/call", json=add)
            assert refused.status_code == 503 and "host-memory budget" in refused.json()["detail"], refused.text
            assert int(refused.headers["Retry-After"]) >= 1
            assert c.delete(f"/twinkle/v1/objects/{object_id}").status_code == 200
            for http, run in ((a, first), (b, second)):
                assert http.post("/api/v1/unload_model", json={"model_id": run}).status_code == 200
            _wait_until(lambda: engine.capacity()["host_bytes_used"] == 0)
            assert "model_id" in _wait(c, _create(c, 2).json()["request_id"])
    finally:
        engine.pool.host_bytes_budget = budget


def test_an_idle_run_is_unloaded_and_reloaded_on_use_with_identical_weights(pool_server) -> None:
    key = _key(pool_server, "idle", max_adapters=1)
    engine = pool_server.state.engine
    with _http(pool_server, key) as http:
        run = _run(http)
        seq = _train_step(http, run, 1)
        _save(http, run, "before", seq)
        seq += 1
        _wait_until(lambda: pool_server.state.store.run(_tenant_id(pool_server, key), run).state == "idle")
        cap = http.get("/api/v1/capacity").json()
        assert cap["unloaded"] >= 1 and cap["tenant"]["held"] == 0  # it no longer counts against the quota
        assert engine.pool.status(engine.slot(pool_server.state.run_slots[run]).adapter) == "unloaded"
        # the quota unit came back: another run fits under the limit of 1 ...
        other = _run(http, 1)
        # ... so reloading the idle one would exceed it: refused with a message that says so
        refused = http.post("/api/v1/save_weights", json={"model_id": run, "path": "x", "seq_id": seq})
        assert "exceed" in _wait(http, refused.json()["request_id"]).get("error", ""), "reload beyond the quota"
        seq += 1
        assert http.post("/api/v1/unload_model", json={"model_id": other}).status_code == 200
        _wait_until(lambda: http.get("/api/v1/capacity").json()["tenant"]["held"] == 0)
        _save(http, run, "after", seq)  # reloaded transparently
        seq += 1
        before = _checkpoint_tensors(pool_server, key, run, "before")
        after = _checkpoint_tensors(pool_server, key, run, "after")
        assert before.keys() == after.keys() and len(before) > 0
        for name, value in before.items():
            assert np.array_equal(value.float().numpy(), after[name].float().numpy()), name
        assert http.get("/api/v1/capacity").json()["tenant"]["held"] == 1
        _train_step(http, run, seq)  # and it keeps training
        assert http.post("/api/v1/unload_model", json={"model_id": run}).status_code == 200


def _tenant_id(server, key: str) -> str:
    return server.state.store.tenant_for_key(key).id


def test_capacity_is_reported_by_both_apis_and_the_cli(pool_server, capsys) -> None:
    from twinkle_server.cli import status_main

    engine = pool_server.state.engine
    key = _key(pool_server, "cap", max_adapters=3)
    with _http(pool_server, key) as http:
        assert httpx.get(pool_server.url + "/api/v1/capacity").status_code == 401
        _wait_until(lambda: engine.capacity()["resident"] + engine.capacity()["paged"] == 0)
        runs = [_run(http, i) for i in range(3)]
        cap = http.get("/api/v1/capacity").json()
        assert cap == http.get("/twinkle/v1/capacity").json()
        one = _one_adapter_bytes(pool_server)
        assert cap["slots"] == 2 and cap["max_adapters"] == 8
        assert cap["resident"] == 2 and cap["paged"] == 1 and cap["free"] == 0 and cap["live"] == 3
        assert cap["host_bytes_used"] == 3 * one and cap["host_bytes_budget"] == 1 << 30
        assert cap["idle_unload_s"] == IDLE_S
        assert cap["tenant"]["held"] == 3 and cap["tenant"]["limit"] == 3
        port = int(pool_server.url.rsplit(":", 1)[1])
        args = argparse.Namespace(host="127.0.0.1", port=port, api_key=key)
        assert status_main(args) == 0
        out = capsys.readouterr().out
        assert "2 of 2 in use" in out and "paged to host     1 adapters" in out and "holds 3 of 3" in out
        assert status_main(argparse.Namespace(host="127.0.0.1", port=port, api_key="tml-wrong")) == 1
        for run in runs:
            assert http.post("/api/v1/unload_model", json={"model_id": run}).status_code == 200


def test_an_idle_twinkle_object_is_parked_and_reloaded_on_its_next_call(pool_server) -> None:
    import torch
    from twinkle.client.codec import decode, encode

    key = _key(pool_server, "idle-obj", max_adapters=1)
    with _http(pool_server, key) as http:
        create = {"kind": "model", "cls": "TransformersModel", "kwargs": {"model_id": BASE}}
        object_id = http.post("/twinkle/v1/objects", json=create).json()["object_id"]

        def call(method: str, *args: Any, **kwargs: Any) -> httpx.Response:
            body = {"method": method, "args": encode(list(args)), "kwargs": encode(kwargs)}
            return http.post(f"/twinkle/v1/objects/{object_id}/call", json=body)

        assert call("add_adapter_to_model", "a", {"r": 4, "target_modules": "all-linear"}).status_code == 200
        assert call("set_optimizer", "AdamW", lr=1e-2).status_code == 200
        rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9]}]
        assert call("forward_backward", inputs=rows).status_code == 200
        assert call("clip_grad_and_step").status_code == 200
        before = decode(call("get_state_dict").json()["result"])
        host = pool_server.state.twinkle_host
        _wait_until(lambda: host.objects[object_id].parked)
        assert pool_server.state.engine.pool.status(f"{object_id}_a") == "unloaded"
        assert http.get("/api/v1/capacity").json()["tenant"]["held"] == 0  # its unit went back
        other = http.post("/twinkle/v1/objects", json=create)
        assert other.status_code == 200  # so another object fits under the limit of 1 ...
        refused = call("get_state_dict")  # ... and the parked one cannot come back while it holds it
        assert refused.status_code == 403 and "exceed" in refused.json()["detail"], refused.text
        assert http.delete(f"/twinkle/v1/objects/{other.json()['object_id']}").status_code == 200
        after = decode(call("get_state_dict").json()["result"])  # reloaded on this call
        assert before.keys() == after.keys() and before
        for name, value in before.items():
            assert torch.equal(value, after[name]), name
        assert call("forward_backward", inputs=rows).status_code == 200  # and it trains on
        assert call("clip_grad_and_step").status_code == 200
        assert http.get("/api/v1/capacity").json()["tenant"]["held"] == 1
        assert http.delete(f"/twinkle/v1/objects/{object_id}").status_code == 200
