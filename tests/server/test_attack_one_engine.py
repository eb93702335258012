"""Attack pass against the one-engine design (every tenant's adapter on one shared model), over HTTP."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("tinker")
pytest.importorskip("peft")

from tests.server.test_hardening import BASE, _call, _create_object, _http, _key, base_digest, same_base  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def whole_attack_leaves_the_base(server):
    """Every base tensor is bit-identical after the module's whole attack sequence (each test checks its own too)."""
    before = base_digest(server)
    yield
    assert same_base(before, base_digest(server)), "the attack sequence changed the shared base"
    assert server.state.engine.trainable_base_weights() == []


@pytest.fixture(scope="module")
def eve(server):
    """A hostile tenant with one model object holding one adapter (objects released at teardown)."""
    with _http(server, _key(server, "eve", max_adapters=8)) as http:
        created = _create_object(http)
        assert created.status_code == 200, created.text
        object_id = created.json()["object_id"]
        added = _call(http, object_id, "add_adapter_to_model", "a", {"r": 4, "target_modules": "all-linear"})
        assert added.status_code == 200, added.text
        yield http, object_id
        http.delete(f"/twinkle/v1/objects/{object_id}")


def test_export_cannot_write_outside_the_tenant_folder(server, eve, tmp_path: Path) -> None:
    http, object_id = eve
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    before = base_digest(server)
    answer = _call(http, object_id, "export", str(victim), merge=True)
    assert 400 <= answer.status_code < 500, answer.text
    assert (victim / "keep.txt").read_text() == "precious"
    assert same_base(before, base_digest(server))


def test_a_checkpoint_from_a_private_model_cannot_write_the_shared_base(server) -> None:
    """A private full-parameter model may save any adapter (modules_to_save, rank over the limit); loading
    that checkpoint into the shared model must not write base weights, nor bypass the adapter checks."""
    with _http(server, _key(server, "eve-ck", max_adapters=8)) as http:
        private = _create_object(http).json()["object_id"]
        shared = _create_object(http).json()["object_id"]
        try:
            assert _call(http, private, "set_optimizer", "AdamW", lr=1e-3).status_code == 200  # now private
            config = {"r": 4, "target_modules": "all-linear", "modules_to_save": ["embed_tokens"]}
            assert _call(http, private, "add_adapter_to_model", "x", config).status_code == 200
            assert _call(http, private, "set_optimizer", "AdamW", lr=0.5).status_code == 200
            rows = [{"input_ids": list(range(5, 25))}]
            assert _call(http, private, "forward_backward", inputs=rows).status_code == 200
            assert _call(http, private, "clip_grad_and_step").status_code == 200
            saved = _call(http, private, "save", "crafted")
            assert saved.status_code == 200, saved.text
            added = _call(http, shared, "add_adapter_to_model", "a", {"r": 4, "target_modules": "all-linear"})
            assert added.status_code == 200, added.text
            before = base_digest(server)
            into_existing = _call(http, shared, "load", "crafted")
            assert into_existing.status_code == 400, into_existing.text
            assert same_base(before, base_digest(server)), "a crafted checkpoint wrote the shared base"
            into_new = _call(http, shared, "load", "crafted", adapter_name="b")
            assert into_new.status_code == 400, into_new.text
            assert same_base(before, base_digest(server)), "a crafted checkpoint wrote the shared base"
            assert server.state.engine.trainable_base_weights() == []
        finally:
            http.delete(f"/twinkle/v1/objects/{private}")
            http.delete(f"/twinkle/v1/objects/{shared}")


def _other_scoped_names(server, object_id: str) -> list[str]:
    return [n for n in server.state.engine.core.adapter_names if not n.startswith(object_id)]


REFUSED_CALLS = [
    pytest.param("model", (), {}, id="attr-model"),
    pytest.param("state_of", ("default",), {}, id="state_of"),
    pytest.param("__dict__", (), {}, id="dunder-dict"),
    pytest.param("_peft", (), {}, id="private-attr"),
    pytest.param("set_kernel_config", (), {}, id="set_kernel_config"),
    pytest.param("merge_and_unload", (), {}, id="merge_and_unload"),
    pytest.param("train", (), {}, id="train-mode"),
    pytest.param("eval", (), {}, id="eval-mode"),
    pytest.param("to", ("float16",), {}, id="dtype"),
    pytest.param("set_gradient_checkpointing", (True,), {}, id="gradient_checkpointing"),
    pytest.param("compile", (), {}, id="compile"),
    pytest.param("push_to_hub", ("x/y",), {}, id="push_to_hub"),
    pytest.param("remove_adapter", ("tinker0",), {}, id="remove-tinker-run"),
    pytest.param("remove_adapter", ("engine_idle",), {}, id="remove-engine-idle"),
    pytest.param("remove_adapter", ("default",), {}, id="remove-default"),
    pytest.param("get_state_dict", (), {"adapter_name": "tinker0"}, id="read-tinker-run"),
    pytest.param("get_state_dict", (), {"adapter_name": "engine_idle"}, id="read-engine-idle"),
    pytest.param(
        "forward_backward", (), {"inputs": [{"input_ids": [5, 6, 7]}], "adapter_name": "tinker0"}, id="train-tinker"
    ),
    pytest.param("add_adapter_to_model", ("../x", {"r": 4}), {}, id="adapter-name-traversal"),
    pytest.param("add_adapter_to_model", ("a", {"r": 4}), {}, id="adapter-name-taken"),
    pytest.param("save", ("../escape",), {}, id="save-traversal"),
    pytest.param("save", ("/tmp/abs",), {}, id="save-absolute"),
    pytest.param("load", ("/etc",), {}, id="load-absolute"),
    pytest.param("load", ("..",), {}, id="load-parent"),
    pytest.param("export", ("../escape",), {}, id="export-traversal"),
    pytest.param("export", ("ok",), {"push_to_hub": True}, id="export-push_to_hub"),
    pytest.param("set_optimizer", ("AdamW",), {"params": []}, id="optimizer-params"),
    pytest.param("set_optimizer", ("os.system",), {}, id="optimizer-dotted-import"),
    pytest.param("set_loss", ("subprocess.Popen",), {}, id="loss-dotted-import"),
    pytest.param("set_template", ("x",), {"model_id": "/etc"}, id="template-path"),
    pytest.param("set_optimizer", ("AdamW",), {"lr": float("nan")}, id="nan-lr"),
    pytest.param("save", ("ck",), {"dataloader": {"x": 1}}, id="save-dataloader"),
]


@pytest.mark.parametrize(("method", "args", "kwargs"), REFUSED_CALLS)
def test_calls_outside_the_tenants_own_adapters_are_refused(server, eve, method, args, kwargs) -> None:
    http, object_id = eve
    before = base_digest(server)
    others = _other_scoped_names(server, object_id)
    answer = _call(http, object_id, method, *args, **kwargs)
    assert 400 <= answer.status_code < 500, answer.text
    assert same_base(before, base_digest(server))
    assert set(others) <= set(server.state.engine.core.adapter_names), "another adapter disappeared"
    assert server.state.engine.trainable_base_weights() == []


@pytest.mark.parametrize(
    "stop",
    [pytest.param([f"s{i}" for i in range(100_000)], id="100k-stop-strings"), pytest.param(["x" * 100_000], id="long")],
)
def test_a_huge_stop_list_is_refused_before_it_reaches_the_sampler(server, stop) -> None:
    """Every stop string is checked after every sampled token: 10^5 of them made one request hold the worker."""
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=server.url, api_key=_key(server, "eve-stop"))
    client = service.create_sampling_client(base_model=BASE)
    started = time.monotonic()
    with pytest.raises(tinker.BadRequestError, match="stop"):
        client.sample(types.ModelInput.from_ints([5, 6, 7]), 4, types.SamplingParams(max_tokens=64, stop=stop)).result()
    assert time.monotonic() - started < 30
    service.close(status="success")


def test_loading_checkpoints_into_new_adapters_counts_against_the_quota(server) -> None:
    """``load(name, adapter_name=new)`` adds an adapter to the shared model: one more quota unit."""
    with _http(server, _key(server, "eve-quota", max_adapters=2)) as http:
        object_id = _create_object(http).json()["object_id"]
        try:
            added = _call(http, object_id, "add_adapter_to_model", "a", {"r": 4, "target_modules": "all-linear"})
            assert added.status_code == 200, added.text
            assert _call(http, object_id, "save", "ck").status_code == 200
            assert _call(http, object_id, "load", "ck", adapter_name="b").status_code == 200  # 2 units
            over = _call(http, object_id, "load", "ck", adapter_name="c")
            assert over.status_code == 403, over.text
            scoped = [n for n in server.state.engine.core.adapter_names if n.startswith(object_id)]
            assert sorted(scoped) == [f"{object_id}_a", f"{object_id}_b"]
            again = _call(http, object_id, "add_adapter_to_model", "big", {"r": 8, "target_modules": "all-linear"})
            assert again.status_code == 403, again.text  # still over the quota
        finally:
            http.delete(f"/twinkle/v1/objects/{object_id}")
        assert not [n for n in server.state.engine.core.adapter_names if n.startswith(object_id)]
