"""Server-side custom losses (SDK 0.38 ``create_custom_loss`` + ``forward_backward_custom`` by handle).

The SDK traces the loss, uploads the graph, and ``forward_backward_custom`` sends ``loss_fn="custom"``;
the server rebuilds the graph from its allow-lists only. The security tests send hand-made graphs
(as a modified client could) that try to escape: builtins, imports, dunder attributes, modules,
huge tensors, unrolled loops.
"""

from __future__ import annotations

import math
import uuid

import httpx
import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
torch = pytest.importorskip("torch")
from tinker import types  # noqa: E402

BASE = "twinkle/tiny-qwen2"


@pytest.fixture(scope="module")
def tenant_key(server) -> str:
    return server.add_tenant(f"closs-{uuid.uuid4().hex[:6]}", max_adapters=8)


@pytest.fixture(scope="module")
def service(server, tenant_key):
    client = tinker.ServiceClient(base_url=server.url, api_key=tenant_key)
    yield client
    client.close(status="success")


@pytest.fixture(scope="module")
def tokens(tiny_tokenizer) -> list[int]:
    return tiny_tokenizer.encode("Twinkle trains many small adapters on one shared base model.")[:16]


def _datum(tokens: list[int], **inputs) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64), **inputs},
    )


def _policy(tc, tokens) -> np.ndarray:
    return tc.forward([_datum(tokens)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()


def weighted_nll(logprobs, weights, scale):
    loss = -(logprobs * weights).sum() * scale
    return loss, {"custom/nll:sum": loss, "custom/tokens:mean": weights.sum()}


def test_uploaded_loss_runs_on_the_server_with_its_value_gradient_and_metrics(service, tokens) -> None:
    assert service.holder.get_client_config().custom_loss_server_side
    handle = service.create_custom_loss(weighted_nll, {"logprobs": 1, "weights": 1, "scale": 0}).result()
    assert handle.loss_id is not None
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    lp = _policy(tc, tokens)
    n = len(tokens) - 1
    w = np.linspace(0.0, 1.0, n).astype(np.float32)
    data = [_datum(tokens, weights=w, scale=np.array(2.0, dtype=np.float32)) for _ in range(2)]
    out = tc.forward_backward_custom(data, handle).result()
    expected = float(-(lp * w).sum() * 2.0)
    assert math.isclose(out.metrics["loss:sum"], 2 * expected, rel_tol=1e-4)
    assert math.isclose(out.metrics["custom/nll:sum"], 2 * expected, rel_tol=1e-4)
    assert math.isclose(out.metrics["custom/tokens:mean"], float(w.sum()), rel_tol=1e-5)
    np.testing.assert_allclose(out.loss_fn_outputs[0]["logprobs"].to_numpy(), lp, rtol=1e-4, atol=1e-5)
    # the same gradient as the built-in cross_entropy with weights 2*w on both datums (grad norms equal;
    # learning rate 0 leaves the adapter as it was)
    g_custom = tc.optim_step(types.AdamParams(learning_rate=0.0)).result().metrics["grad_norm"]
    ref = tc
    ref.forward_backward([_datum(tokens, weights=2 * w) for _ in range(2)], "cross_entropy").result()
    g_ref = ref.optim_step(types.AdamParams(learning_rate=0.0)).result().metrics["grad_norm"]
    assert g_custom > 0 and math.isclose(g_custom, g_ref, rel_tol=1e-3)


def dpo_like(logprobs, ref_logprobs, weights):
    margin = ((logprobs - ref_logprobs) * weights).sum()
    loss = -torch.nn.functional.logsigmoid(0.1 * margin)
    return loss, {"custom/margin:mean": margin}


def test_a_loss_with_torch_functional_and_detach_runs(service, tokens) -> None:
    handle = service.create_custom_loss(dpo_like, {"logprobs": 1, "ref_logprobs": 1, "weights": 1}).result()
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    lp = _policy(tc, tokens)
    n = len(tokens) - 1
    ref = (lp - 0.5).astype(np.float32)
    out = tc.forward_backward_custom(
        [_datum(tokens, ref_logprobs=ref, weights=np.ones(n, np.float32))], handle
    ).result()
    margin = 0.5 * n
    assert math.isclose(out.metrics["custom/margin:mean"], margin, rel_tol=1e-3)
    assert math.isclose(out.metrics["loss:sum"], math.log1p(math.exp(-0.1 * margin)), rel_tol=1e-3)


def test_a_handle_of_another_session_or_unknown_id_is_refused(server, tenant_key, service, tokens) -> None:
    other = tinker.ServiceClient(base_url=server.url, api_key=tenant_key)
    try:

        def mine(logprobs, weights):
            return -(logprobs * weights).sum(), {}

        handle = other.create_custom_loss(mine, {"logprobs": 1, "weights": 1}).result()
        tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
        n = len(tokens) - 1
        # sent by hand (the SDK refuses a foreign handle before sending)
        with pytest.raises(Exception, match="another session"):
            tc.forward_backward(
                [_datum(tokens, weights=np.ones(n, np.float32))], "custom", {"loss_id": handle.loss_id}
            ).result()
        with pytest.raises(Exception, match="not known"):
            tc.forward_backward(
                [_datum(tokens, weights=np.ones(n, np.float32))], "custom", {"loss_id": "loss-nope"}
            ).result()
    finally:
        other.close(status="success")


# -- hand-made graphs: what a modified client could send -----------------------------------------
def _post(server, key, session_id, nodes, inputs=(("logprobs", 1),)) -> httpx.Response:
    body = {
        "session_id": session_id,
        "custom_loss_seq_id": 0,
        "name": "evil",
        "inputs": [{"name": n, "rank": r} for n, r in inputs],
        "graph": {"format": 1, "nodes": nodes},
    }
    return httpx.post(f"{server.url}/api/v1/create_custom_loss", json=body, headers={"X-API-Key": key}, timeout=30)


def _graph(*middle, out="loss"):
    return [
        {"op": "placeholder", "name": "logprobs", "target": "logprobs"},
        *middle,
        {"op": "output", "name": "output", "target": "output", "args": [{"tuple": [{"ref": out}, {"dict": {}}]}]},
    ]


def _call(name, target, *args, op="call_function", **kwargs):
    return {"op": op, "name": name, "target": target, "args": list(args), "kwargs": kwargs}


@pytest.mark.parametrize(
    ("node", "refused"),
    [
        (_call("loss", "builtins.eval", "__import__('os').system('true')"), "builtins.eval"),
        (_call("loss", "builtins.__import__", "os"), "builtins.__import__"),
        (_call("loss", "os.system", "true"), "os.system"),
        (_call("loss", "torch.load", "/etc/passwd"), "torch.load"),
        (_call("loss", "torch.from_file", "/etc/passwd"), "torch.from_file"),
        (_call("loss", "builtins.getattr", {"ref": "logprobs"}, "__class__"), "__class__"),
        (_call("loss", "builtins.getattr", {"ref": "logprobs"}, "data_ptr"), "data_ptr"),
        (_call("loss", "__reduce_ex__", {"ref": "logprobs"}, 2, op="call_method"), "__reduce_ex__"),
        (_call("loss", "numpy", {"ref": "logprobs"}, op="call_method"), "numpy"),
        (_call("loss", "backward", {"ref": "logprobs"}, op="call_method"), "backward"),
        (_call("loss", "zero_", {"ref": "logprobs"}, op="call_method"), "zero_"),
        ({"op": "get_attr", "name": "loss", "target": "weight", "args": [], "kwargs": {}}, "get_attr"),
        ({"op": "call_module", "name": "loss", "target": "lin", "args": [], "kwargs": {}}, "call_module"),
        (_call("loss", "torch.zeros", 1 << 40), "torch.zeros"),
        (_call("loss", "to", {"ref": "logprobs"}, {"device": "cuda"}, op="call_method"), "device"),
    ],
)
def test_anything_off_the_allow_list_is_a_400_that_names_it(server, tenant_key, service, node, refused) -> None:
    resp = _post(server, tenant_key, service.holder.get_session_id(), _graph(node))
    assert resp.status_code == 400, resp.text
    assert refused in resp.json()["detail"]


def test_an_unrolled_loop_past_the_node_limit_is_refused(server, tenant_key, service) -> None:
    from twinkle_server.tinker_custom_loss import MAX_NODES

    loop = [_call("n0", "operator.mul", {"ref": "logprobs"}, 1.0)]
    loop += [_call(f"n{i}", "operator.mul", {"ref": f"n{i - 1}"}, 1.0) for i in range(1, MAX_NODES + 5)]
    resp = _post(server, tenant_key, service.holder.get_session_id(), _graph(*loop, out=f"n{MAX_NODES + 4}"))
    assert resp.status_code in (400, 422), resp.text
    assert "nodes" in str(resp.json()["detail"])


def test_huge_tensors_and_int_bombs_fail_before_allocating(service, server, tenant_key, tokens) -> None:
    """Graphs that pass the allow-list but would allocate T*T*... or a 2**(2**k) integer: the request fails."""
    sid = service.holder.get_session_id()
    n = len(tokens) - 1
    outer = _graph(
        _call("a", "unsqueeze", {"ref": "logprobs"}, 1, op="call_method"),
        _call("b", "expand", {"ref": "a"}, n, 1 << 30, op="call_method"),
        _call("loss", "sum", {"ref": "b"}, op="call_method"),
    )
    bomb = _graph(
        _call("p", "operator.pow", 2, 4096),
        _call("loss", "sum", {"ref": "logprobs"}, op="call_method"),
    )
    for graph in (outer, bomb):
        resp = _post(server, tenant_key, sid, graph)
        assert resp.status_code == 200, resp.text
        # the future resolves at once to the loss id
        fut = httpx.post(
            f"{server.url}/api/v1/retrieve_future",
            json={"request_id": resp.json()["request_id"]},
            headers={"X-API-Key": tenant_key},
            timeout=30,
        ).json()
        loss_id = fut["loss_id"]
        tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
        with pytest.raises(Exception, match="elements|64 bits"):
            tc.forward_backward([_datum(tokens)], "custom", {"loss_id": loss_id}).result()
        tc.forward_backward([_datum(tokens)], "cross_entropy").result()  # the run (and server) still train


def test_the_interpreter_refuses_dunder_strings_in_getattr_and_non_numbers_in_arithmetic() -> None:
    from twinkle_server.tinker_custom_loss import CustomLossError, compile_graph, run_graph

    nodes = compile_graph(
        _graph(_call("s", "operator.mul", [1], 1 << 20), _call("loss", "sum", {"ref": "logprobs"}, op="call_method")),
        [("logprobs", 1)],
    )
    with pytest.raises(CustomLossError, match="only on numbers"):
        run_graph(nodes, [torch.zeros(3)], deadline=float("inf"))
    with pytest.raises(CustomLossError, match="limit of"):
        run_graph(nodes, [torch.zeros(3)], deadline=0.0)
