"""External weights: ``save_weights_external``, signed download URLs and ``tinker checkpoint download``,
through the official SDK 0.38 and its CLI against `twinkle serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

BASE = "twinkle/tiny-qwen2"


@pytest.fixture(scope="module")
def tenant_key(server) -> str:
    return server.add_tenant(f"weights-{uuid.uuid4().hex[:6]}", max_adapters=8)


@pytest.fixture(scope="module")
def service(server, tenant_key):
    client = tinker.ServiceClient(base_url=server.url, api_key=tenant_key)
    yield client
    client.close(status="success")


@pytest.fixture(scope="module")
def trained(service, tiny_tokenizer):
    """A run trained one step, with an external weights export."""
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    tokens = tiny_tokenizer.encode("Twinkle exports adapters in the Hugging Face format.")
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64)},
    )
    tc.forward_backward([datum], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    path = tc.save_weights_external("final").result().path
    return tc, path


def _rest(service):
    return service.create_rest_client()


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read()


def test_export_is_a_peft_adapter_downloadable_by_signed_urls(server, service, trained) -> None:
    from safetensors.numpy import load

    tc, path = trained
    assert path == f"tinker://{tc.model_id}/external_weights/final"
    rest = _rest(service)
    listed = rest.list_checkpoints(tc.model_id).result().checkpoints
    [row] = [c for c in listed if c.tinker_path == path]
    assert row.checkpoint_type == "external" and row.size_bytes > 0
    urls = rest.get_external_weights_urls(path).result()
    assert set(urls.urls) == {"adapter_config.json", "adapter_model.safetensors"}
    assert 0 < (urls.expires.timestamp() - time.time()) <= 3600 + 5
    config = json.loads(_fetch(urls.urls["adapter_config.json"]))
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == BASE
    tensors = load(_fetch(urls.urls["adapter_model.safetensors"]))
    assert tensors and all(k.startswith("base_model.model.") for k in tensors)
    # the trained adapter: B moved off its zero init after one step
    assert any(np.abs(v).max() > 0 for k, v in tensors.items() if "lora_B" in k)
    # the same tensors as the run's own adapter, saved as a sampler checkpoint (no step in between)
    tc.save_weights_for_sampler("same").result()
    [on_disk] = Path(server.state.config.checkpoint_root).glob(f"*/{tc.model_id}/sampler/same")
    saved = load((on_disk / "adapter_model.safetensors").read_bytes())
    assert saved.keys() == tensors.keys()
    for key in tensors:
        np.testing.assert_array_equal(saved[key], tensors[key])


def test_a_url_opens_only_its_own_file_until_it_expires(server, service, trained) -> None:
    _, path = trained
    urls = _rest(service).get_external_weights_urls(path).result().urls
    good = urls["adapter_config.json"]
    parts = urlsplit(good)
    query = parse_qs(parts.query)
    base = f"{parts.scheme}://{parts.netloc}{parts.path.rsplit('/', 1)[0]}"

    def status(url: str) -> int:
        return httpx.get(url, timeout=30).status_code

    assert status(good) == 200
    sig, expires = query["sig"][0], int(query["expires"][0])
    # another file with this file's signature, a forged signature, a later expiry, traversal
    assert status(f"{base}/adapter_model.safetensors?expires={expires}&sig={sig}") == 403
    assert status(f"{base}/adapter_config.json?expires={expires}&sig={'0' * 64}") == 403
    assert status(f"{base}/adapter_config.json?expires={expires + 3600}&sig={sig}") == 403
    assert status(f"{base}/..%2F..%2Fstate.sqlite?expires={expires}&sig={sig}") in (403, 404)
    assert status(f"{base}/url_signing.key?expires={expires}&sig={sig}") == 403
    # another tenant's run id in the path with this signature
    other = base.replace(parts.path.split("/")[4], "someone-else")
    assert status(f"{other}/adapter_config.json?expires={expires}&sig={sig}") == 403
    # an expired but correctly signed URL
    from twinkle_server.tinker_weights import signature, signing_key

    tenant_id, run_id, name = parts.path.split("/")[4:7]
    past = int(time.time()) - 1
    forged = signature(signing_key(server.state.config.state_dir), tenant_id, run_id, name, "adapter_config.json", past)
    assert status(f"{base}/adapter_config.json?expires={past}&sig={forged}") == 403
    # the key file is private
    assert oct((Path(server.state.config.state_dir) / "url_signing.key").stat().st_mode & 0o777) == "0o600"


def test_another_tenant_cannot_sign_urls_for_this_checkpoint(server, trained) -> None:
    _, path = trained
    intruder = tinker.ServiceClient(base_url=server.url, api_key=server.add_tenant(f"intruder-{uuid.uuid4().hex[:6]}"))
    try:
        with pytest.raises(Exception, match="not found"):
            intruder.create_rest_client().get_external_weights_urls(path).result()
    finally:
        intruder.close(status="success")


def test_encrypted_export_ttl_and_delete(service, trained) -> None:
    pyrage = pytest.importorskip("pyrage")
    tc, _ = trained
    identity = pyrage.x25519.Identity.generate()
    path = (
        tc.save_weights_external("sealed", ttl_seconds=7200, age_encryption_recipients=[str(identity.to_public())])
        .result()
        .path
    )
    rest = _rest(service)
    urls = rest.get_external_weights_urls(path).result()
    assert set(urls.urls) == {"adapter_config.json.age", "adapter_model.safetensors.age"}
    assert urls.expires.timestamp() <= time.time() + 3600 + 5
    config = json.loads(pyrage.decrypt(_fetch(urls.urls["adapter_config.json.age"]), [identity]))
    assert config["r"] == 4
    listed = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert listed[path].expires_at is not None
    with pytest.raises(Exception, match="age"):
        tc.save_weights_external("bad", age_encryption_recipients=["not-a-key"]).result()
    rest.delete_checkpoint_from_tinker_path(path).result()
    with pytest.raises(urllib.error.HTTPError):
        _fetch(urls.urls["adapter_config.json.age"])


def test_external_weights_cannot_be_loaded_as_a_training_checkpoint(service, trained) -> None:
    _, path = trained
    with pytest.raises(Exception, match="external weights"):
        service.create_training_client_from_state(path).result()


@pytest.mark.parametrize("which", ["external", "training"])
def test_tinker_cli_checkpoint_download(server, tenant_key, trained, tmp_path, which) -> None:
    """`tinker checkpoint download` of the export, and of a training checkpoint (exported on the fly)."""
    tc, path = trained
    if which == "training":
        path = tc.save_state("for-cli").result().path
    env = {**os.environ, "TINKER_BASE_URL": server.url, "TINKER_API_KEY": tenant_key, "TINKER_TELEMETRY": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "tinker.cli", "--format", "json", "checkpoint", "download", path, "-o", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [target] = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((target / "adapter_config.json").read_text())["r"] == 4


def test_merged_export_is_a_full_model_with_the_runs_logprobs(server_factory, tmp_path, tiny_tokenizer) -> None:
    """ServerConfig(external_weights="merged"): a plain HF model (core's export) that computes what the run does."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    from twinkle_server.config import ServerConfig

    running = server_factory(
        ServerConfig(state_dir=tmp_path / "state", external_weights="merged", max_adapters=4, device="cpu")
    )
    try:
        client = tinker.ServiceClient(base_url=running.url, api_key=running.add_tenant("merged"))
        tc = client.create_lora_training_client(base_model=BASE, rank=4).result()
        tokens = tiny_tokenizer.encode("Merged weights fold the adapter into the base.")
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64)},
        )
        tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
        lp = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
        path = tc.save_weights_external("merged").result().path
        urls = _rest(client).get_external_weights_urls(path).result().urls
        assert "config.json" in urls and not any(name.startswith("adapter_") for name in urls)
        out = tmp_path / "download"
        out.mkdir()
        for name, url in urls.items():
            (out / name).write_bytes(_fetch(url))
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():
            logits = model(torch.tensor([tokens[:-1]])).logits[0]
        merged = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0].numpy()
        # float32 passes of the same weights (merged in float64 then cast): equal to float32 rounding
        np.testing.assert_allclose(merged, lp, rtol=0, atol=2e-4)
        client.close(status="success")
    finally:
        running.stop()


def test_serve_flag_picks_the_export_format(tmp_path) -> None:
    import argparse

    from twinkle_server.cli import _config, add_serve_arguments

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert _config(parser.parse_args(["--state-dir", str(tmp_path)])).external_weights == "adapter"
    merged = parser.parse_args(["--state-dir", str(tmp_path), "--external-weights", "merged"])
    assert _config(merged).external_weights == "merged"
    with pytest.raises(SystemExit):
        parser.parse_args(["--external-weights", "zip"])
