"""Service hardening (issue 31), at the HTTP level on a real loopback server.

Each test reproduces an attack of the issue and checks the server refuses it; the attack suite
checksums every base tensor before and after each tenant operation.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from typing import Any

import httpx
import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
pytest.importorskip("peft")
from tinker import types  # noqa: E402

BASE = "twinkle/tiny-qwen2"


def _key(server, prefix: str, **quotas: Any) -> str:
    return server.add_tenant(f"{prefix}-{uuid.uuid4().hex[:6]}", **quotas)


def _http(server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=120)


def base_digest(server) -> dict[str, str]:
    """SHA-256 of every base tensor the server holds (the engine's, and the twinkle API model's)."""
    from twinkle_server.twinkle_host import host

    def digest(t) -> str:
        return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()

    out = {f"engine:{n}": digest(p) for n, p in server.state.engine.base_parameters.items()}
    model = host(server.state)._model
    if model is not None:  # the same tensors when shared (the default); peft's wrapping renames them
        for n, p in model.model.named_parameters():
            if "lora_" not in n:
                out[f"twinkle:{n.replace('base_model.model.', '', 1).replace('.base_layer', '')}"] = digest(p)
    return out


def same_base(before: dict[str, str], after: dict[str, str]) -> bool:
    """Every tensor hashed both times is unchanged (the twinkle API's model may appear in between)."""
    assert all(k in after for k in before if k.startswith("engine:"))
    return all(after[k] == v for k, v in before.items() if k in after)


def _create_object(http: httpx.Client, kind: str = "model", cls: str = "TransformersModel") -> httpx.Response:
    kwargs = {} if kind == "checkpoint_engine" else {"model_id": BASE}
    return http.post("/twinkle/v1/objects", json={"kind": kind, "cls": cls, "args": [], "kwargs": kwargs})


def _call(http: httpx.Client, object_id: str, method: str, *args: Any, **kwargs: Any) -> httpx.Response:
    from twinkle.client.codec import encode

    body = {"method": method, "args": encode(list(args)), "kwargs": encode(kwargs)}
    return http.post(f"/twinkle/v1/objects/{object_id}/call", json=body)


@pytest.fixture(scope="module")
def bob(server):
    """A tenant with one remote model object (raw HTTP, as an attacker would send)."""
    with _http(server, _key(server, "bob", max_adapters=64)) as http:
        created = _create_object(http)
        assert created.status_code == 200, created.text
        yield http, created.json()["object_id"]


# -- 1: nothing a tenant sends changes the shared base --------------------------------------------
BASE_WRITING_OPTIONS = [
    pytest.param({"init_lora_weights": "pissa"}, "init_lora_weights", id="pissa"),
    pytest.param({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights", id="pissa_niter"),
    pytest.param({"init_lora_weights": "olora"}, "init_lora_weights", id="olora"),
    pytest.param({"init_lora_weights": "loftq"}, "init_lora_weights", id="loftq"),
    pytest.param({"init_lora_weights": "corda"}, "init_lora_weights", id="corda"),
    pytest.param({"init_lora_weights": "orthogonal"}, "init_lora_weights", id="orthogonal"),
    pytest.param({"bias": "all"}, "bias", id="bias_all"),
    pytest.param({"bias": "lora_only"}, "bias", id="bias_lora_only"),
    pytest.param({"modules_to_save": ["lm_head"]}, "modules_to_save", id="modules_to_save"),
    pytest.param({"layer_replication": [[0, 2], [0, 2]]}, "layer_replication", id="layer_replication"),
    pytest.param({"trainable_token_indices": [1, 2]}, "trainable_token_indices", id="trainable_tokens"),
    pytest.param({"use_dora": True}, "use_dora", id="dora"),
    pytest.param({"target_parameters": ["mlp.down_proj.weight"]}, "target_parameters", id="target_parameters"),
    pytest.param({"no_such_option": 1}, "no_such_option", id="unknown_option"),
]


@pytest.mark.parametrize(("options", "named"), BASE_WRITING_OPTIONS)
def test_adapter_options_off_the_allow_list_are_refused_naming_them(server, bob, options, named) -> None:
    http, object_id = bob
    before = base_digest(server)
    config = {"r": 4, "target_modules": "all-linear", **options}
    answer = _call(http, object_id, "add_adapter_to_model", f"evil{uuid.uuid4().hex[:6]}", config)
    assert answer.status_code == 400, answer.text
    assert named in answer.json()["detail"]
    assert same_base(before, base_digest(server)), "a refused adapter option changed the shared base"


def test_pissa_through_the_twinkle_client_leaves_every_tenant_logprob_unchanged(server) -> None:
    """The issue's reproduction: as bob, LoraConfig(init_lora_weights='pissa') through the real client."""
    import twinkle
    from peft import LoraConfig
    from twinkle.client.session import ServerError
    from twinkle.model import TransformersModel

    service = tinker.ServiceClient(base_url=server.url, api_key=_key(server, "alice"))
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    tokens = list(range(5, 25))
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": np.array(tokens[1:])}
    )
    before = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    digest = base_digest(server)
    with twinkle.initialize(mode="http", base_url=server.url, api_key=_key(server, "bob")):
        model = TransformersModel(model_id=BASE)
        with pytest.raises(ServerError, match="init_lora_weights"):
            model.add_adapter_to_model("evil", LoraConfig(r=4, target_modules="all-linear", init_lora_weights="pissa"))
        model.add_adapter_to_model("fine", LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
        model.set_optimizer("AdamW", lr=1e-2)
        model.forward_backward(inputs=[{"input_ids": list(range(7, 27))}])
        model.clip_grad_and_step()
    after = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_array_equal(before, after)
    assert same_base(digest, base_digest(server))
    service.close(status="success")


def test_the_attack_suite_never_changes_a_base_tensor(server) -> None:
    """Every tenant operation below (allowed or refused) leaves every base tensor bit-identical."""
    key = _key(server, "mallory", max_adapters=64)
    digest = base_digest(server)
    with _http(server, key) as http:
        object_id = _create_object(http).json()["object_id"]
        add = "add_adapter_to_model"
        operations = [
            ("add pissa", add, ["a1", {"r": 4, "init_lora_weights": "pissa"}], {}),
            ("add olora", add, ["a2", {"r": 4, "init_lora_weights": "olora"}], {}),
            ("add bias", add, ["a3", {"r": 4, "bias": "all"}], {}),
            ("add huge rank", add, ["a4", {"r": 2048}], {}),
            ("add nan alpha", add, ["a5", {"r": 4, "lora_alpha": float("nan")}], {}),
            ("add modules_to_save", add, ["a6", {"r": 4, "modules_to_save": ["lm_head"]}], {}),
            ("add ok", add, ["ok", {"r": 4, "target_modules": "all-linear"}], {}),
            ("nan lr", "set_optimizer", ["AdamW"], {"lr": float("nan")}),
            ("optimizer", "set_optimizer", ["AdamW"], {"lr": 1e-2}),
            ("train", "forward_backward", [], {"inputs": [{"input_ids": list(range(3, 40))}]}),
            ("step", "clip_grad_and_step", [], {}),
            ("template path", "set_template", ["Template"], {"model_id": "/etc"}),
            ("template hub", "set_template", ["Template"], {"model_id": "hf://Qwen/Qwen2.5-0.5B"}),
            ("remove positional", "remove_adapter", ["ok", "extra"], {}),
            ("save traversal", "save", ["../../escape"], {}),
        ]
        for what, method, args, kwargs in operations:
            answer = _call(http, object_id, method, *args, **kwargs)
            assert answer.status_code < 500, (what, answer.status_code, answer.text)
            assert same_base(digest, base_digest(server)), f"{what!r} changed the shared base"


# -- 2: one quota ledger for both APIs -----------------------------------------------------------
def test_rank_above_max_rank_is_refused_in_the_twinkle_api(server, bob) -> None:
    http, object_id = bob
    answer = _call(http, object_id, "add_adapter_to_model", "big", {"r": 2048, "target_modules": "all-linear"})
    assert answer.status_code == 400 and "--max-rank" in answer.json()["detail"], answer.text
    answer = _call(http, object_id, "add_adapter_to_model", "pattern", {"r": 4, "rank_pattern": {"q_proj": 999}})
    assert answer.status_code == 400 and "rank_pattern" in answer.json()["detail"], answer.text


def test_adapters_of_one_object_count_against_the_tenant_limit(server) -> None:
    with _http(server, _key(server, "hoarder", max_adapters=2)) as http:
        object_id = _create_object(http).json()["object_id"]
        assert _call(http, object_id, "add_adapter_to_model", "a", {"r": 4}).status_code == 200
        assert _call(http, object_id, "add_adapter_to_model", "b", {"r": 4}).status_code == 200
        third = _call(http, object_id, "add_adapter_to_model", "c", {"r": 4})
        assert third.status_code == 403 and "limit is 2" in third.json()["detail"], third.text
        # removing one frees its unit
        assert _call(http, object_id, "remove_adapter", "b").status_code == 200
        assert _call(http, object_id, "add_adapter_to_model", "c", {"r": 4}).status_code == 200


def test_concurrent_object_creations_respect_the_limit(server) -> None:
    key = _key(server, "racer", max_adapters=4)
    codes: list[int] = []
    lock = threading.Lock()

    def create() -> None:
        with _http(server, key) as http:
            code = _create_object(http).status_code
        with lock:
            codes.append(code)

    # the worker is held while the 12 requests arrive: every creation is in flight at once (the old
    # server checked the count before its await and added the object after it: all 12 succeeded)
    server.state.scheduler.pause()
    try:
        threads = [threading.Thread(target=create) for _ in range(12)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(codes) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        server.state.scheduler.resume()
    for t in threads:
        t.join(timeout=300)
    assert sorted(codes) == [200] * 4 + [403] * 8, codes


def test_tinker_runs_and_twinkle_objects_share_one_limit(server) -> None:
    key = _key(server, "both", max_adapters=1)
    service = tinker.ServiceClient(base_url=server.url, api_key=key)
    service.create_lora_training_client(base_model=BASE, rank=4).result()
    with _http(server, key) as http:
        refused = _create_object(http)
        assert refused.status_code == 403 and "both APIs" in refused.json()["detail"], refused.text
    service.close(status="success")

    key = _key(server, "both2", max_adapters=1)
    with _http(server, key) as http:
        assert _create_object(http).status_code == 200
        sid = http.post("/api/v1/create_session", json={"tags": [], "sdk_version": "t"}).json()["session_id"]
        run = http.post(
            "/api/v1/create_model",
            json={"session_id": sid, "model_seq_id": 0, "base_model": BASE, "lora_config": {"rank": 4}},
        )
        assert run.status_code == 403, run.text


def test_concurrent_tinker_run_creations_respect_the_limit(server) -> None:
    key = _key(server, "tracer", max_adapters=2)
    with _http(server, key) as http:
        sid = http.post("/api/v1/create_session", json={"tags": [], "sdk_version": "t"}).json()["session_id"]
    codes: list[int] = []
    lock = threading.Lock()

    def create(i: int) -> None:
        with _http(server, key) as http:
            code = http.post(
                "/api/v1/create_model",
                json={"session_id": sid, "model_seq_id": i, "base_model": BASE, "lora_config": {"rank": 4}},
            ).status_code
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(codes) == [200] * 2 + [403] * 8, codes
    time.sleep(0)  # runs stay; the session fixture's server is shared
