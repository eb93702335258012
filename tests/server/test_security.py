"""Tenant isolation, authentication, hashed keys, limits, quotas and error hygiene."""

from __future__ import annotations

import uuid

import httpx
import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

BASE = "twinkle/tiny-qwen2"


def _client(server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=60)


def _wait(http: httpx.Client, request_id: str) -> dict:
    for _ in range(60):
        body = http.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()
        if body.get("type") != "try_again":
            return body
    raise AssertionError("future never finished")


@pytest.fixture(scope="module")
def tenant_a(server):
    """Tenant A with one run, a training checkpoint and a sampler checkpoint."""
    key = server.add_tenant(f"a-{uuid.uuid4().hex[:6]}")
    service = tinker.ServiceClient(base_url=server.url, api_key=key)
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    tokens = list(range(5, 25))
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": np.array(tokens[1:])}
    )
    tc.forward_backward([datum], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    path = tc.save_state("secret").result().path
    sampler_path = tc.save_weights_for_sampler("secret-sampler").result().path
    session_id = service.holder.get_session_id()
    yield {"key": key, "run": tc.model_id, "path": path, "sampler_path": sampler_path, "session": session_id}
    service.close(status="success")


@pytest.fixture(scope="module")
def key_b(server) -> str:
    return server.add_tenant(f"b-{uuid.uuid4().hex[:6]}")


def test_tenant_b_cannot_touch_tenant_a(server, tenant_a, key_b) -> None:
    run, path, sampler_path = tenant_a["run"], tenant_a["path"], tenant_a["sampler_path"]
    with _client(server, key_b) as b:
        sid = b.post("/api/v1/create_session", json={"tags": [], "sdk_version": "t"}).json()["session_id"]
        # list / get A's run and checkpoints
        assert b.get(f"/api/v1/training_runs/{run}/checkpoints").status_code == 404
        assert b.get(f"/api/v1/training_runs/{run}").status_code == 404
        assert run not in b.get("/api/v1/training_runs").text
        assert b.get("/api/v1/checkpoints").json()["checkpoints"] == []
        # sample from / load A's checkpoints, even with exact paths
        for p in (path, sampler_path):
            created = b.post(
                "/api/v1/create_sampling_session",
                json={"session_id": sid, "sampling_session_seq_id": 0, "model_path": p},
            )
            assert created.status_code == 404
            sample = b.post(
                "/api/v1/asample",
                json={
                    "prompt": {"chunks": [{"tokens": [1, 2]}]},
                    "sampling_params": {"max_tokens": 2},
                    "model_path": p,
                },
            )
            assert sample.status_code == 404
            load = b.post(
                "/api/v1/load_weights", json={"session_id": sid, "model_seq_id": 7, "path": p, "optimizer": False}
            )
            assert load.status_code == 404
            assert b.post("/api/v1/weights_info", json={"tinker_path": p}).status_code == 404
        # delete A's checkpoint
        assert b.delete(f"/api/v1/training_runs/{run}/checkpoints/weights/secret").status_code == 404
        assert b.delete(f"/api/v1/training_runs/{run}").status_code == 404
        # drive A's run, session or futures
        assert b.post("/api/v1/optim_step", json={"model_id": run, "adam_params": {}}).status_code == 404
        assert b.post("/api/v1/session_heartbeat", json={"session_id": tenant_a["session"]}).status_code == 404
        assert b.get(f"/api/v1/sessions/{tenant_a['session']}").status_code == 404
        assert b.post("/api/v1/retrieve_future", json={"request_id": "req-000000000000000000000000"}).status_code == 404
    with _client(server, tenant_a["key"]) as a:  # still all there for A
        names = [c["tinker_path"] for c in a.get(f"/api/v1/training_runs/{run}/checkpoints").json()["checkpoints"]]
        assert names == [path, sampler_path]


@pytest.mark.parametrize(
    "bad_path",
    [
        "tinker://../../etc/weights/passwd",
        "tinker://run/weights/../../../../etc/passwd",
        "tinker://run/weights/..",
        "tinker://run/weights/.hidden",
        "tinker://run/other/name",
        "/etc/passwd",
        "file:///etc/passwd",
    ],
)
def test_path_traversal_is_rejected(server, tenant_a, bad_path) -> None:
    with _client(server, tenant_a["key"]) as a:
        sid = tenant_a["session"]
        r = a.post(
            "/api/v1/load_weights", json={"session_id": sid, "model_seq_id": 99, "path": bad_path, "optimizer": False}
        )
        assert r.status_code in (400, 404), r.text
        assert "Traceback" not in r.text
        r = a.post("/api/v1/save_weights", json={"model_id": tenant_a["run"], "path": "../../evil"})
        assert r.status_code == 400 and "not allowed" in r.json()["detail"]
        r = a.delete(f"/api/v1/training_runs/{tenant_a['run']}/checkpoints/weights/..%2F..%2Fsecret")
        assert r.status_code in (400, 404)


def test_authentication_and_hashed_keys(server, tenant_a) -> None:
    with httpx.Client(base_url=server.url) as anon:
        assert anon.get("/api/v1/healthz").json() == {"status": "ok"}
        missing = anon.get("/api/v1/training_runs")
        assert missing.status_code == 401 and "X-API-Key" in missing.json()["detail"]
        wrong = anon.get("/api/v1/training_runs", headers={"X-API-Key": "tml-not-a-key"})
        assert wrong.status_code == 401
        bearer = anon.get("/api/v1/training_runs", headers={"Authorization": f"Bearer {tenant_a['key']}"})
        assert bearer.status_code == 200
    raw = server.state.config.database.read_bytes()
    wal = server.state.config.database.with_name("state.sqlite-wal")
    raw += wal.read_bytes() if wal.exists() else b""
    assert tenant_a["key"].encode() not in raw
    from twinkle_server.store import hash_key

    tenant = server.state.store.tenant_for_key(tenant_a["key"])  # found by the key's hash alone
    assert tenant is not None and tenant.name.startswith("a-")
    assert server.state.store.tenant_for_key(tenant_a["key"] + "x") is None
    assert hash_key(tenant_a["key"]).encode() in raw


#: The only routes that take no API key: the health check, and the external-weights download
#: (authorized by its HMAC-signed URL instead).
OPEN_ROUTES = {"/api/v1/healthz", "/api/v1/external_weights/{tenant_id}/{run_id}/{name}/{file}"}


def test_every_api_route_requires_an_api_key(server) -> None:
    """Whichever router module holds a route (tinker_api, tinker_runs, tinker_sampling, ...), it
    authenticates through current_tenant; the two open routes are named above."""
    from fastapi.routing import APIRoute
    from twinkle_server.auth import current_tenant

    def calls(dependant) -> set:
        found = {dependant.call}
        for sub in dependant.dependencies:
            found |= calls(sub)
        return found

    def api_routes(routes) -> list:
        found = []
        for route in routes:
            if isinstance(route, APIRoute):
                found.append(route)
            elif hasattr(route, "original_router"):  # FastAPI >= 0.165 keeps an included router whole
                found += api_routes(route.original_router.routes)
        return found

    routes = [r for r in api_routes(server.app.routes) if r.path.startswith(("/api/", "/twinkle/"))]
    assert {"/api/v1/training_runs", "/api/v1/asample", "/api/v1/forward_backward", "/twinkle/v1/objects"} <= {
        r.path for r in routes
    }
    open_routes = {r.path for r in routes if current_tenant not in calls(r.dependant)}
    assert open_routes == OPEN_ROUTES
    with httpx.Client(base_url=server.url) as anon:
        assert anon.get("/api/v1/checkpoints").status_code == 401
        assert anon.post("/api/v1/asample", json={}).status_code == 401
        assert anon.delete("/api/v1/training_runs/x").status_code == 401


def test_request_size_limit(server, tenant_a) -> None:
    limit = server.state.config.max_body_bytes
    with _client(server, tenant_a["key"]) as a:
        r = a.post("/api/v1/create_session", content=b"x" * (limit + 1), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "limit" in r.json()["detail"]

        def chunks():
            for _ in range(limit // 65536 + 2):
                yield b"y" * 65536

        r = a.post("/api/v1/forward_backward", content=chunks(), headers={"Content-Type": "application/x-protobuf"})
        assert r.status_code == 413


def test_quotas_answer_4xx_with_a_message(server) -> None:
    key = server.add_tenant(
        f"q-{uuid.uuid4().hex[:6]}", max_adapters=1, max_tokens_per_request=64, requests_per_minute=600
    )
    with _client(server, key) as q:
        sid = q.post("/api/v1/create_session", json={"tags": [], "sdk_version": "t"}).json()["session_id"]
        body = {"session_id": sid, "base_model": BASE, "lora_config": {"rank": 2}}
        first = q.post("/api/v1/create_model", json={**body, "model_seq_id": 0})
        assert first.status_code == 200
        _wait(q, first.json()["request_id"])
        second = q.post("/api/v1/create_model", json={**body, "model_seq_id": 1})
        assert second.status_code == 403 and "limit is 1" in second.json()["detail"]
        too_long = q.post(
            "/api/v1/asample",
            json={
                "prompt": {"chunks": [{"tokens": list(range(60))}]},
                "sampling_params": {"max_tokens": 10},
                "base_model": BASE,
            },
        )
        assert too_long.status_code == 413 and "per request" in too_long.json()["detail"]
        rank = q.post("/api/v1/create_model", json={**body, "model_seq_id": 2, "lora_config": {"rank": 4096}})
        assert rank.status_code == 400 and "max rank" in rank.json()["detail"]
    key = server.add_tenant(f"r-{uuid.uuid4().hex[:6]}", requests_per_minute=3)
    with _client(server, key) as r:
        sid = r.post("/api/v1/create_session", json={"tags": [], "sdk_version": "t"}).json()["session_id"]
        codes = [
            r.post(
                "/api/v1/asample",
                json={
                    "prompt": {"chunks": [{"tokens": [1, 2]}]},
                    "sampling_params": {"max_tokens": 1},
                    "base_model": BASE,
                },
            ).status_code
            for _ in range(5)
        ]
        assert codes[:3] == [200, 200, 200] and codes[3] == 429, codes
        limited = r.post(
            "/api/v1/asample",
            json={"prompt": {"chunks": [{"tokens": [1]}]}, "sampling_params": {"max_tokens": 1}, "base_model": BASE},
        )
        assert "requests per minute" in limited.json()["detail"]
        assert sid


def test_bad_input_is_a_clear_4xx_without_traceback(server, tenant_a) -> None:
    with _client(server, tenant_a["key"]) as a:
        garbage = a.post(
            "/api/v1/forward_backward", content=b"\xff\x00garbage", headers={"Content-Type": "application/x-protobuf"}
        )
        assert garbage.status_code == 400 and "protobuf" in garbage.json()["detail"]
        wrong_type = a.post("/api/v1/forward_backward", content=b"{}", headers={"Content-Type": "application/json"})
        assert wrong_type.status_code == 415
        bad_json = a.post("/api/v1/optim_step", content=b"{not json", headers={"Content-Type": "application/json"})
        assert bad_json.status_code == 422
        oob = a.post(
            "/api/v1/asample",
            json={
                "prompt": {"chunks": [{"tokens": [10**9]}]},
                "sampling_params": {"max_tokens": 1},
                "base_model": BASE,
            },
        )
        assert oob.status_code == 200
        failed = _wait(a, oob.json()["request_id"])
        assert failed["category"] == "user" and "token ids must be in" in failed["error"]
        for response in (garbage, wrong_type, bad_json):
            assert "Traceback" not in response.text and 'File "' not in response.text
