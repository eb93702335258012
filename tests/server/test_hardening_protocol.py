"""Service hardening (issue 31), protocol items: decoding off the event loop, the seq_id window,
non-finite values, model ids, API docs, names, rate limits. Real loopback servers; the tinker SDK."""

from __future__ import annotations

import math
import threading
import time
import uuid
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

BASE = "twinkle/tiny-qwen2"
PROTO = {"Content-Type": "application/x-protobuf"}


def _key(server, prefix: str, **quotas: Any) -> str:
    return server.add_tenant(f"{prefix}-{uuid.uuid4().hex[:6]}", **quotas)


def _http(server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=120)


def _wait(http: httpx.Client, request_id: str, tries: int = 120) -> dict:
    for _ in range(tries):
        body = http.post("/api/v1/retrieve_future", json={"request_id": request_id})
        assert body.status_code == 200, body.text
        data = body.json()
        if data.get("type") != "try_again":
            return data
    raise AssertionError("future never finished")


def _run(http: httpx.Client, seq: int = 0) -> str:
    sid = http.post("/api/v1/create_session", json={"tags": [], "sdk_version": "t"}).json()["session_id"]
    fut = http.post(
        "/api/v1/create_model",
        json={"session_id": sid, "model_seq_id": seq, "base_model": BASE, "lora_config": {"rank": 4}},
    )
    assert fut.status_code == 200, fut.text
    _wait(http, fut.json()["request_id"])
    return fut.json()["model_id"]


def _fb_body(
    model_id: str,
    tokens: list[int],
    inputs: dict[str, Any],
    *,
    seq_id: int = 1,
    loss_fn="cross_entropy",
    config: dict[str, float] | None = None,
) -> bytes:
    """A raw protobuf ForwardBackwardRequest; ``inputs``: numpy arrays or ('sparse', shape, crow, col, val)."""
    from tinker.proto import tinker_public_pb2 as pb

    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn=loss_fn)
    for k, v in (config or {}).items():
        msg.loss_fn_config[k] = v
    datum = msg.data.add()
    chunk = datum.model_input.add()
    chunk.encoded_text.tokens = np.asarray(tokens, dtype=np.int32).tobytes()
    for name, value in inputs.items():
        tensor = datum.loss_fn_inputs[name]
        if isinstance(value, tuple):
            _, shape, crow, col, val = value
            tensor.dtype = pb.DTYPE_FLOAT32
            tensor.shape.extend(shape)
            tensor.sparse_csr.crow_indices = np.asarray(crow, dtype=np.int64).tobytes()
            tensor.sparse_csr.col_indices = np.asarray(col, dtype=np.int64).tobytes()
            tensor.sparse_csr.values = np.asarray(val, dtype=np.float32).tobytes()
        else:
            arr = np.asarray(value)
            tensor.dtype = pb.DTYPE_INT64 if arr.dtype.kind == "i" else pb.DTYPE_FLOAT32
            tensor.shape.extend(arr.shape)
            tensor.dense = arr.astype(np.int64 if arr.dtype.kind == "i" else np.float32).tobytes()
    return msg.SerializeToString()


@pytest.fixture(scope="module")
def roomy(tmp_path_factory, engine, server_factory) -> Iterator[Any]:
    """A second server on the shared engine: 64 MiB bodies, short seq_id expiry, a small control rate."""
    from twinkle_server.config import ServerConfig

    config = ServerConfig(
        state_dir=tmp_path_factory.mktemp("roomy"),
        max_adapters=64,
        max_rank=32,
        max_body_bytes=64 * 1024 * 1024,
        long_poll_s=1.0,
        seq_wait_s=1.5,
        control_requests_per_minute=6000,
    )
    running = server_factory(config, engine)
    yield running
    running.stop()


# -- 3: request bodies checked from declared shapes, decoded off the event loop ---------------------
def _healthz_latencies(url: str, stop: threading.Event, warm: threading.Event, out: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        http.get("/api/v1/healthz")  # the connection, before measuring
        warm.set()
        while not stop.is_set():
            start = time.monotonic()
            assert http.get("/api/v1/healthz").status_code == 200
            out.append(time.monotonic() - start)
            time.sleep(0.01)


@pytest.mark.parametrize("own_run", [True, False], ids=["own_run", "no_such_run"])
def test_a_huge_declared_sparse_tensor_neither_stalls_the_server_nor_is_built(roomy, own_run) -> None:
    """The issue's 24 MB body declaring a [3,000,000, 1] sparse tensor: refused, /healthz answers within 100 ms."""
    rows = 3_000_000
    with _http(roomy, _key(roomy, "freezer")) as http:
        model_id = _run(http) if own_run else "sess-nope:train:0"
        body = _fb_body(
            model_id,
            list(range(5, 15)),
            {
                "target_tokens": np.arange(6, 16),
                "weights": ("sparse", [rows, 1], np.zeros(rows + 1, dtype=np.int64), [], []),
            },
        )
        assert len(body) > 20 * 1024 * 1024
        stop, warm, latencies = threading.Event(), threading.Event(), []
        poller = threading.Thread(target=_healthz_latencies, args=(roomy.url, stop, warm, latencies))
        poller.start()
        warm.wait(30)
        time.sleep(0.1)
        try:
            answer = http.post("/api/v1/forward_backward", content=body, headers=PROTO)
            time.sleep(0.2)
        finally:
            stop.set()
            poller.join()
    if own_run:
        assert answer.status_code == 400 and "declares shape [3000000, 1]" in answer.json()["detail"], answer.text
    else:
        assert answer.status_code == 404, answer.text
    # the old server decoded inside the event loop: /healthz stalled 3.4 s. The bound is 100 ms; the test
    # allows scheduling noise of a loaded CI machine (client, server and poller share one process) on
    # single samples, never a stall
    latencies.sort()
    assert len(latencies) > 5 and latencies[len(latencies) // 2] < 0.1 and latencies[-1] < 1.0, latencies


def test_dense_inputs_larger_than_their_datum_are_refused(roomy) -> None:
    with _http(roomy, _key(roomy, "dense")) as http:
        model_id = _run(http)
        body = _fb_body(model_id, [5, 6, 7], {"target_tokens": np.arange(6, 10), "weights": np.ones(1000)})
        answer = http.post("/api/v1/forward_backward", content=body, headers=PROTO)
        assert answer.status_code == 400 and "weights" in answer.json()["detail"], answer.text


# -- 4: a bounded window for out-of-order seq_ids, and an expiry -----------------------------------
def test_a_seq_id_far_ahead_is_refused_at_once(server) -> None:
    with _http(server, _key(server, "pinner")) as http:
        model_id = _run(http)
        for seq in (10**9, 10**9 + 1, 129 + 1):
            answer = http.post(
                "/api/v1/optim_step",
                json={"model_id": model_id, "seq_id": seq, "adam_params": {"learning_rate": 1e-3}},
            )
            assert answer.status_code == 400 and "ahead" in answer.json()["detail"], answer.text
        tokens = list(range(5, 25))
        body = _fb_body(model_id, tokens[:-1], {"target_tokens": np.array(tokens[1:])}, seq_id=10**9)
        answer = http.post("/api/v1/forward_backward", content=body, headers=PROTO)
        assert answer.status_code == 400 and "ahead" in answer.json()["detail"], answer.text
        # the run still works in order
        ok = http.post(
            "/api/v1/optim_step", json={"model_id": model_id, "seq_id": 1, "adam_params": {"learning_rate": 1e-3}}
        )
        assert ok.status_code == 200 and "metrics" in _wait(http, ok.json()["request_id"])


@pytest.mark.parametrize("refused", ["forward_backward", "optim_step", "save_weights", "load_weights"])
def test_a_refused_request_still_takes_its_turn(server, refused) -> None:
    """Issue 32 item 4: a request refused with a 4xx keeps its client's sequence moving.

    The next ``seq_id`` runs at once instead of waiting ``seq_wait_s`` (600 s here) for the
    refused one, whose future (for a client that reads it) fails with the same reason.
    """
    with _http(server, _key(server, "turns")) as http:
        model_id = _run(http)
        tokens = list(range(5, 25))
        if refused == "forward_backward":
            body = _fb_body(model_id, tokens[:-1], {"target_tokens": np.array(tokens[1:])}, loss_fn="no_such_loss")
            answer = http.post("/api/v1/forward_backward", content=body, headers=PROTO)
        else:
            payload = {
                "optim_step": {"optimizer_params": {"type": "sgd"}},
                "save_weights": {"path": "ck", "ttl_seconds": 5},
                "load_weights": {"path": f"tinker://{model_id}/weights/missing"},
            }[refused]
            answer = http.post(f"/api/v1/{refused}", json={"model_id": model_id, "seq_id": 1, **payload})
        assert 400 <= answer.status_code < 500, answer.text
        ok = http.post(
            "/api/v1/optim_step", json={"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 1e-3}}
        )
        assert ok.status_code == 200, ok.text
        started = time.monotonic()
        result = _wait(http, ok.json()["request_id"], tries=15)  # long polls of 2 s: 30 s against 600 s
        assert "metrics" in result, result
        assert time.monotonic() - started < 30


def test_a_request_waiting_for_a_seq_id_that_never_comes_expires(roomy) -> None:
    with _http(roomy, _key(roomy, "waiter")) as http:
        model_id = _run(http)
        waiting = http.post(
            "/api/v1/optim_step", json={"model_id": model_id, "seq_id": 3, "adam_params": {"learning_rate": 1e-3}}
        )
        assert waiting.status_code == 200, waiting.text
        result = _wait(http, waiting.json()["request_id"], tries=30)
        assert "never arrived" in result["error"], result


# -- 8: non-finite values -----------------------------------------------------------------------------
def test_a_non_finite_loss_keeps_futures_readable_and_the_adapter_unchanged(server) -> None:
    service = tinker.ServiceClient(base_url=server.url, api_key=_key(server, "nan"))
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    tokens = list(range(5, 25))

    def datum(weight: float) -> types.Datum:
        return types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={
                "target_tokens": np.array(tokens[1:]),
                "weights": np.full(len(tokens) - 1, weight, dtype=np.float32),
            },
        )

    tc.forward_backward([datum(1.0)], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()  # B is no longer zero
    before = tc.forward([datum(1.0)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    out = tc.forward_backward([datum(3e38)], "cross_entropy").result()  # overflows: an infinite loss
    assert not math.isfinite(out.metrics["loss:sum"])
    step = tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()  # readable, not a JSON error
    assert step.metrics["skipped_non_finite"] == 1.0
    assert not math.isfinite(step.metrics["grad_norm"])
    after = tc.forward([datum(1.0)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_array_equal(before, after)
    assert np.isfinite(after).all()
    # the run trains on afterwards
    tc.forward_backward([datum(1.0)], "cross_entropy").result()
    assert "skipped_non_finite" not in tc.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics
    service.close(status="success")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_configs_are_refused(server, value) -> None:
    with _http(server, _key(server, "ppo")) as http:
        model_id = _run(http)
        tokens = list(range(5, 25))
        n = len(tokens) - 1
        inputs = {"target_tokens": np.array(tokens[1:]), "logprobs": np.zeros(n), "advantages": np.ones(n)}
        body = _fb_body(model_id, tokens[:-1], inputs, loss_fn="ppo", config={"clip_low_threshold": value})
        answer = http.post("/api/v1/forward_backward", content=body, headers=PROTO)
        assert answer.status_code == 400 and "finite" in answer.json()["detail"], answer.text


# -- 9: model ids resolve only to what the server serves ---------------------------------------------
@pytest.mark.parametrize("model_id", ["/etc", "/nonexistent", "hf://Qwen/Qwen2.5-0.5B", "ms://qwen/x", "../../x"])
def test_tenant_model_ids_never_reach_the_filesystem_or_the_hub(server, model_id) -> None:
    from twinkle.client.codec import encode

    with _http(server, _key(server, "paths")) as http:
        created = http.post(
            "/twinkle/v1/objects", json={"kind": "model", "cls": "TransformersModel", "kwargs": {"model_id": BASE}}
        )
        object_id = created.json()["object_id"]
        add = {"method": "add_adapter_to_model", "args": encode(["a", {"r": 4}]), "kwargs": {}}
        assert http.post(f"/twinkle/v1/objects/{object_id}/call", json=add).status_code == 200
        body = {"method": "set_template", "args": ["Template"], "kwargs": {"model_id": model_id}}
        answer = http.post(f"/twinkle/v1/objects/{object_id}/call", json=body)
        assert answer.status_code == 400 and "model_id" in answer.json()["detail"], answer.text
        served = {"method": "set_template", "args": ["Template"], "kwargs": {"model_id": BASE}}
        assert http.post(f"/twinkle/v1/objects/{object_id}/call", json=served).status_code == 200
        refused = http.post(
            "/twinkle/v1/objects", json={"kind": "model", "cls": "TransformersModel", "kwargs": {"model_id": model_id}}
        )
        assert refused.status_code == 400, refused.text


# -- 10: API docs off by default ------------------------------------------------------------------------
def test_api_docs_are_off_by_default(server) -> None:
    key = _key(server, "docs")
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert httpx.get(server.url + path).status_code == 404, path
        assert httpx.get(server.url + path, headers={"X-API-Key": key}).status_code == 404, path


def test_the_docs_flag_serves_the_schema_behind_a_key(tmp_path, engine, server_factory) -> None:
    from twinkle_server.config import ServerConfig

    running = server_factory(ServerConfig(state_dir=tmp_path, max_adapters=64, max_rank=32, api_docs=True), engine)
    try:
        assert httpx.get(running.url + "/openapi.json").status_code == 401
        key = running.add_tenant("docs-reader")
        schema = httpx.get(running.url + "/openapi.json", headers={"X-API-Key": key})
        assert schema.status_code == 200 and "/api/v1/forward_backward" in schema.json()["paths"]
        assert httpx.get(running.url + "/docs").status_code == 404  # no HTML page loading CDN scripts
    finally:
        running.stop()


# -- 11: strict names, 4xx for client mistakes, Retry-After, every route rate-limited --------------------
@pytest.mark.parametrize("name", ["ck1\n", "ck\r", "ck\x00", "ck\t1", "a/b", "..", ".hidden"])
def test_checkpoint_names_with_control_characters_are_refused(server, name) -> None:
    with _http(server, _key(server, "names")) as http:
        model_id = _run(http)
        answer = http.post("/api/v1/save_weights", json={"model_id": model_id, "path": name, "seq_id": 1})
        assert answer.status_code == 400, (name, answer.text)
        listed = http.get(f"/api/v1/training_runs/{model_id}/checkpoints").json()["checkpoints"]
        assert listed == []


def test_429_carries_retry_after(server) -> None:
    with _http(server, _key(server, "rate", requests_per_minute=2)) as http:
        model_id = _run(http)  # create_model spends one compute request
        codes = []
        for seq in range(1, 4):
            answer = http.post(
                "/api/v1/optim_step",
                json={"model_id": model_id, "seq_id": seq, "adam_params": {"learning_rate": 1e-3}},
            )
            codes.append(answer.status_code)
            if answer.status_code == 429:
                assert int(answer.headers["Retry-After"]) >= 1
                break
        assert codes[-1] == 429, codes


def test_every_authenticated_route_is_rate_limited(tmp_path, engine, server_factory) -> None:
    from twinkle_server.config import ServerConfig

    config = ServerConfig(
        state_dir=tmp_path, max_adapters=64, max_rank=32, control_requests_per_minute=5, requests_per_minute=5
    )
    running = server_factory(config, engine)
    try:
        with _http(running, running.add_tenant("lister")) as http:
            codes = [http.get("/api/v1/training_runs").status_code for _ in range(8)]
            assert codes[:5] == [200] * 5 and codes[5:] == [429] * 3, codes
            limited = http.post("/api/v1/create_session", json={"tags": [], "sdk_version": "t"})
            assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
            polled = http.post("/api/v1/retrieve_future", json={"request_id": "req-x"})
            assert polled.status_code == 429
        assert httpx.get(running.url + "/api/v1/healthz").status_code == 200  # healthz stays open
    finally:
        running.stop()


# -- 6 and 7: slots reclaimed from idle runs, pool-full at creation; futures pruned, results capped --------
@pytest.fixture(scope="module")
def small_pool(tmp_path_factory, server_factory) -> Iterator[Any]:
    """A server with its own 2-slot engine, 1.5 s run idleness, 1.5 s future TTL, 64 KiB results."""
    from twinkle_server.config import ServerConfig, tiny_model_dir
    from twinkle_server.engine import LoRAEngine

    config = ServerConfig(
        state_dir=tmp_path_factory.mktemp("small"),
        max_adapters=2,
        max_rank=8,
        long_poll_s=1.0,
        run_idle_s=1.5,
        future_ttl_s=1.5,
        max_result_bytes=64 * 1024,
    )
    running = server_factory(config, LoRAEngine(tiny_model_dir(), max_adapters=2, max_rank=8))
    yield running
    running.stop()


def _create(http: httpx.Client, seq: int) -> httpx.Response:
    sid = http.post("/api/v1/create_session", json={"tags": [], "sdk_version": "t"}).json()["session_id"]
    return http.post(
        "/api/v1/create_model",
        json={"session_id": sid, "model_seq_id": seq, "base_model": BASE, "lora_config": {"rank": 4}},
    )


def test_a_full_pool_is_answered_at_creation_and_idle_runs_give_their_slots_back(small_pool) -> None:
    keys = [_key(small_pool, f"slot{i}") for i in range(3)]
    with _http(small_pool, keys[0]) as a, _http(small_pool, keys[1]) as b, _http(small_pool, keys[2]) as c:
        first, second = _create(a, 0), _create(b, 0)
        assert first.status_code == 200 and second.status_code == 200
        full = _create(c, 0)  # at the create call itself, not a future that fails later
        assert full.status_code == 503 and "slots" in full.json()["detail"], full.text
        assert int(full.headers["Retry-After"]) >= 1
        time.sleep(3.5)  # both runs idle past run_idle_s: unloaded, their slots reclaimed
        third = _create(c, 1)
        assert third.status_code == 200, third.text
        assert "model_id" in _wait(c, third.json()["request_id"])
        run = a.get(f"/api/v1/training_runs/{first.json()['model_id']}").json()
        assert run["training_run_id"] == first.json()["model_id"]  # still listed; its checkpoints stay loadable
        step = a.post(
            "/api/v1/optim_step",
            json={"model_id": first.json()["model_id"], "seq_id": 1, "adam_params": {"learning_rate": 1e-3}},
        )
        assert "no longer in memory" in _wait(a, step.json()["request_id"])["error"]


def test_finished_futures_are_pruned_after_their_ttl(small_pool) -> None:
    import sqlite3

    with _http(small_pool, _key(small_pool, "ttl")) as http:
        fut = _create(http, 0)
        assert "model_id" in _wait(http, fut.json()["request_id"])
        time.sleep(3.5)
        gone = http.post("/api/v1/retrieve_future", json={"request_id": fut.json()["request_id"]})
        assert gone.status_code == 404, gone.text
    with sqlite3.connect(small_pool.state.config.database) as db:
        old = db.execute("SELECT COUNT(*) FROM futures WHERE status != 'pending' AND created < ?", (time.time() - 5,))
        assert old.fetchone()[0] == 0


def test_large_results_are_not_stored(small_pool) -> None:
    from twinkle.client.codec import encode

    with _http(small_pool, _key(small_pool, "big")) as http:
        object_id = http.post(
            "/twinkle/v1/objects", json={"kind": "model", "cls": "TransformersModel", "kwargs": {"model_id": BASE}}
        ).json()["object_id"]
        add = {"method": "add_adapter_to_model", "args": encode(["a", {"r": 8, "target_modules": "all-linear"}])}
        assert http.post(f"/twinkle/v1/objects/{object_id}/call", json=add).status_code == 200
        big = http.post(f"/twinkle/v1/objects/{object_id}/call", json={"method": "get_state_dict"})
        assert big.status_code == 400 and "larger than this server keeps" in big.json()["detail"], big.text
    import os

    assert os.path.getsize(small_pool.state.config.database) < 1024 * 1024  # the state dict never went in


def test_a_base_model_sampling_client_samples(server) -> None:
    """create_sampling_client(base_model=...) used to fail with "weight snapshot is no longer in memory"."""
    service = tinker.ServiceClient(base_url=server.url, api_key=_key(server, "base-sampler"))
    sampler = service.create_sampling_client(base_model=BASE).result()
    prompt = types.ModelInput.from_ints([5, 6, 7, 8])
    out = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=4, seed=1, temperature=0.0)).result()
    assert len(out.sequences) == 2 and all(len(s.tokens) == 4 for s in out.sequences)
    service.close(status="success")


def test_idle_twinkle_objects_are_released_and_free_their_quota(small_pool) -> None:
    from twinkle.client.codec import encode

    with _http(small_pool, _key(small_pool, "idle-obj", max_adapters=1)) as http:
        create = {"kind": "model", "cls": "TransformersModel", "kwargs": {"model_id": BASE}}
        object_id = http.post("/twinkle/v1/objects", json=create).json()["object_id"]
        add = {"method": "add_adapter_to_model", "args": encode(["a", {"r": 4}])}
        assert http.post(f"/twinkle/v1/objects/{object_id}/call", json=add).status_code == 200
        assert http.post("/twinkle/v1/objects", json=create).status_code == 403  # the limit is 1
        time.sleep(3.5)  # idle past run_idle_s: released
        gone = http.post(f"/twinkle/v1/objects/{object_id}/call", json={"method": "get_state_dict"})
        assert gone.status_code == 404, gone.text
        assert http.post("/twinkle/v1/objects", json=create).status_code == 200  # its unit came back


def test_sampling_parameters_out_of_range_are_a_422_at_once(server) -> None:
    with _http(server, _key(server, "params")) as http:
        for params in ({"max_tokens": -1}, {"max_tokens": 0}, {"max_tokens": 2, "seed": 2**70}):
            answer = http.post(
                "/api/v1/asample",
                json={"prompt": {"chunks": [{"tokens": [1, 2, 3]}]}, "base_model": BASE, "sampling_params": params},
            )
            assert answer.status_code == 422, (params, answer.text)


def test_a_created_adapter_is_never_counted_twice_as_reserved_and_live(tmp_path, server_factory) -> None:
    """The reservation of a create is handed over in the same quota-lock section as the adapter enters the
    pool: a create checked at that moment sees one live adapter, not one live plus one reserved (which was a
    spurious 503 on a two-slot server under load)."""
    from types import SimpleNamespace

    from twinkle_server.config import ServerConfig, tiny_model_dir
    from twinkle_server.engine import ALL_TARGETS, LoRAEngine
    from twinkle_server.quotas import QuotaExceeded

    config = ServerConfig(state_dir=tmp_path / "state", max_adapters=2, max_rank=8)
    running = server_factory(config, LoRAEngine(tiny_model_dir(), max_adapters=2, max_rank=8))
    state, engine = running.state, running.state.engine
    seen: dict[str, Any] = {}
    real_create = engine.create_slot

    def create_then_check(*args: Any, **kwargs: Any) -> int:
        slot = real_create(*args, **kwargs)  # the adapter is in the pool now; its reservation not yet released

        def concurrent_create() -> None:
            try:
                seen["reservation"] = state.admission.reserve_slot(4, ALL_TARGETS)
            except QuotaExceeded as exc:
                seen["error"] = exc

        other = threading.Thread(target=concurrent_create)
        other.start()
        other.join(0.3)  # it waits for the handover instead of counting the adapter twice
        seen["waited"] = other.is_alive()
        seen["thread"] = other
        return slot

    try:
        reservation = state.admission.reserve_slot(4, ALL_TARGETS)
        engine.create_slot = create_then_check
        try:
            state.create_run_slot(SimpleNamespace(id="t1"), "run-1", {"rank": 4}, reservation)
        finally:
            engine.create_slot = real_create
        seen["thread"].join(5)
        assert seen["waited"], "a concurrent create was checked while the new adapter counted twice"
        assert "error" not in seen, seen.get("error")
        assert state.admission.creating == 1  # the concurrent create's own reservation; the first one was handed over
        seen["reservation"].release()
        seen["reservation"].release()  # idempotent
        assert state.admission.creating == 0
    finally:
        running.stop()
