"""Property-based fuzzing (hypothesis) of every operation in the server's OpenAPI schema,
and N tenants training at the same time.

The fuzzer reads ``/openapi.json`` from the running server, builds request bodies from
each operation's schema (valid shapes with hostile values, plus arbitrary JSON and bytes)
and asserts the server never answers 5xx and never leaks a traceback.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
HOSTILE_TEXT = st.sampled_from(["", "..", "../../etc/passwd", "tinker://x/weights/..", "a" * 300, "\x00", "weights/ok"])


def schema_strategy(schema: dict[str, Any], components: dict[str, Any], depth: int = 0) -> st.SearchStrategy:
    """A strategy for values of a (FastAPI-generated) JSON schema, biased towards edge cases."""
    if "$ref" in schema:
        return schema_strategy(components[schema["$ref"].split("/")[-1]], components, depth)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([schema_strategy(s, components, depth) for s in schema[key]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        return st.text(max_size=40) | HOSTILE_TEXT
    if kind == "integer":
        return st.integers(-(2**33), 2**33) | st.sampled_from([0, 1, -1, 2**31])
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False, width=32) | st.integers(-10, 10)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array" or depth > 3:
        items = schema.get("items", {})
        return st.lists(schema_strategy(items, components, depth + 1) if items else ANY_JSON, max_size=5)
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        fields = {name: schema_strategy(sub, components, depth + 1) for name, sub in props.items() if name in required}
        optional = {
            name: schema_strategy(sub, components, depth + 1) for name, sub in props.items() if name not in required
        }
        return st.fixed_dictionaries(fields, optional=optional)
    return ANY_JSON


@pytest.fixture(scope="module")
def fuzz_key(server) -> str:
    return server.add_tenant(f"fuzz-{uuid.uuid4().hex[:6]}", requests_per_minute=100_000)


@pytest.fixture(scope="module")
def operations(server) -> list[tuple[str, str, st.SearchStrategy]]:
    spec = server.app.openapi()  # the schema is not served (API docs are off by default)
    components = spec.get("components", {}).get("schemas", {})
    ops = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            content = op.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                body = schema_strategy(content["application/json"]["schema"], components) | ANY_JSON
            else:
                body = st.binary(max_size=200) if content else st.none()
            ops.append((method.upper(), path, body))
    assert len(ops) > 30
    return ops


def _fill(path: str, value: str) -> str:
    out, depth = [], 0
    for ch in path:
        if ch == "{":
            depth += 1
            out.append(value)
        elif ch == "}":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def test_fuzz_every_operation_never_500s(server, fuzz_key, operations) -> None:
    client = httpx.Client(base_url=server.url, headers={"X-API-Key": fuzz_key}, timeout=60)

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        method, path, body_strategy = data.draw(st.sampled_from(operations))
        segment = data.draw(HOSTILE_TEXT | st.text(alphabet="abcdef-:0123456789", min_size=1, max_size=30))
        url = _fill(path, quote(segment, safe="") or "x")
        body = data.draw(body_strategy)
        if isinstance(body, bytes):
            response = client.request(method, url, content=body, headers={"Content-Type": "application/x-protobuf"})
        elif body is None and method == "GET":
            response = client.request(method, url, params={"limit": data.draw(st.integers(-5, 5000))})
        else:
            response = client.request(method, url, json=body)
        assert response.status_code < 500, (method, url, body, response.text)
        assert "Traceback" not in response.text and 'File "' not in response.text

    try:
        check()
    finally:
        client.close()


def test_concurrent_tenants_train_independently(server) -> None:
    tinker = pytest.importorskip("tinker")
    from tinker import types

    n = 6
    results: dict[int, list[float]] = {}
    errors: list[BaseException] = []

    def train(i: int) -> None:
        try:
            key = server.add_tenant(f"conc-{i}-{uuid.uuid4().hex[:4]}")
            service = tinker.ServiceClient(base_url=server.url, api_key=key)
            tc = service.create_lora_training_client(base_model="twinkle/tiny-qwen2", rank=4, seed=i).result()
            tokens = [(i * 37 + k * 11) % 2000 + 5 for k in range(25)]
            datum = types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": np.array(tokens[1:])},
            )
            losses = []
            for _ in range(5):
                losses.append(tc.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"])
                tc.optim_step(types.AdamParams(learning_rate=3e-3)).result()
            tc.save_state("final").result()
            assert [
                c.checkpoint_id
                for c in tinker.RestClient(base_url=server.url, api_key=key)
                .list_user_checkpoints()
                .result()
                .checkpoints
            ] == ["weights/final"]
            results[i] = losses
            service.close(status="success")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert len(results) == n
    for losses in results.values():
        assert losses[-1] < losses[0]
