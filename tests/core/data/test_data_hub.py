"""Model and data set ids: local paths short-circuit; ms:// and hf:// reach the hub libraries (faked there)."""

from __future__ import annotations

import json

import pytest
from twinkle.hub import HubError, resolve_dataset_dir, resolve_model_dir, split_hub_id


@pytest.fixture
def hub_calls(monkeypatch, tmp_path):
    """Replace the hub download functions (the network boundary) with recorders returning a local dir."""
    import huggingface_hub
    import modelscope

    calls: list[tuple] = []
    target = tmp_path / "downloaded"
    target.mkdir()

    def recorder(name):
        def download(repo_id, **kwargs):
            calls.append((name, repo_id, kwargs))
            return str(target)

        return download

    monkeypatch.setattr(modelscope, "snapshot_download", recorder("ms-model"))
    monkeypatch.setattr(modelscope, "dataset_snapshot_download", recorder("ms-dataset"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", recorder("hf"))
    return calls, target


def test_local_dir_never_reaches_the_hub(hub_calls, tiny_dir):
    calls, _ = hub_calls
    assert resolve_model_dir(tiny_dir) == tiny_dir
    assert resolve_model_dir("ms://" + tiny_dir) == tiny_dir
    assert resolve_dataset_dir("hf://" + tiny_dir) == tiny_dir
    assert calls == []


def test_ms_model_id_calls_modelscope(hub_calls):
    calls, target = hub_calls
    assert resolve_model_dir("ms://Qwen/Qwen2.5-7B-Instruct", revision="v1") == str(target)
    assert calls == [("ms-model", "Qwen/Qwen2.5-7B-Instruct", {"revision": "v1"})]


def test_hf_model_and_dataset_ids_call_huggingface_hub(hub_calls):
    calls, _ = hub_calls
    resolve_model_dir("hf://Qwen/Qwen2.5-0.5B", allow_patterns=["*.json"])
    resolve_dataset_dir("hf://openai/gsm8k")
    assert calls == [
        ("hf", "Qwen/Qwen2.5-0.5B", {"allow_patterns": ["*.json"]}),
        ("hf", "openai/gsm8k", {"repo_type": "dataset"}),
    ]


def test_bare_org_name_defaults_to_modelscope(hub_calls):
    calls, _ = hub_calls
    resolve_dataset_dir("swift/self-cognition")
    assert calls == [("ms-dataset", "swift/self-cognition", {})]


def test_bad_ids_get_clear_errors(hub_calls):
    calls, _ = hub_calls
    with pytest.raises(FileNotFoundError, match="not an existing local path"):
        resolve_model_dir("./no/such/dir")
    with pytest.raises(HubError, match="org/name"):
        resolve_model_dir("ms://just-a-name")
    with pytest.raises(HubError):
        resolve_model_dir("")
    assert split_hub_id("hf://a/b") == ("hf", "a/b")
    assert calls == []


def test_template_and_dataset_resolve_hub_ids_through_the_helper(hub_calls, tiny_dir):
    """Template(ms://...) and DatasetMeta(hf://...) go through the same resolution, up to the download."""
    import shutil

    calls, target = hub_calls
    shutil.copytree(tiny_dir, target, dirs_exist_ok=True)
    (target / "train.jsonl").write_text(
        "\n".join(json.dumps({"instruction": f"say {i}", "input": "", "output": str(i)}) for i in range(5)) + "\n"
    )
    from twinkle.dataset import Dataset, DatasetMeta
    from twinkle.template.base import Template

    template = Template("ms://Qwen/Qwen2.5-7B-Instruct")
    assert template.encode({"messages": [{"role": "user", "content": "x"}]}, add_generation_prompt=True)["length"] > 0
    dataset = Dataset(dataset_meta=DatasetMeta("hf://tatsu-lab/alpaca", data_slice=range(3)))
    assert len(dataset) == 3 and dataset[2]["output"] == "2"
    assert [c[:2] for c in calls] == [("ms-model", "Qwen/Qwen2.5-7B-Instruct"), ("hf", "tatsu-lab/alpaca")]


def test_offline_hf_id_names_the_cause_and_the_fix_not_the_hub_library_error(tmp_path):
    """HF_HUB_OFFLINE=1 and an empty cache: the real huggingface_hub refuses; twinkle says what to do."""
    import subprocess
    import sys

    code = """
import sys
from twinkle.hub import HubOfflineError, resolve_model_dir
try:
    resolve_model_dir("hf://Qwen/Qwen2.5-0.5B-Instruct")
except HubOfflineError as exc:
    print(type(exc.original).__name__)
    print(exc)
    sys.exit(0)
sys.exit("no HubOfflineError")
"""
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    original, message = result.stdout.split("\n", 1)
    assert original == "LocalEntryNotFoundError"
    assert "hf://Qwen/Qwen2.5-0.5B-Instruct is not in the local cache and HF_HUB_OFFLINE is set" in message
    assert "hf download Qwen/Qwen2.5-0.5B-Instruct" in message and "Traceback" not in result.stderr


def test_unreachable_modelscope_is_a_clear_error(monkeypatch):
    import modelscope
    import requests
    from twinkle.hub import HubOfflineError

    def no_network(repo_id, **kwargs):
        raise requests.exceptions.ConnectionError("Max retries exceeded with url: /api/v1/models")

    monkeypatch.setattr(modelscope, "snapshot_download", no_network)
    with pytest.raises(HubOfflineError, match="ms://Qwen/Qwen2.5-7B-Instruct is not in the local cache") as err:
        resolve_model_dir("ms://Qwen/Qwen2.5-7B-Instruct")
    assert "modelscope download --model Qwen/Qwen2.5-7B-Instruct" in str(err.value)
    assert err.value.__cause__ is None and isinstance(err.value.original, requests.exceptions.ConnectionError)


def test_other_hub_errors_are_not_disguised_as_offline(monkeypatch):
    import huggingface_hub

    def denied(repo_id, **kwargs):
        raise PermissionError("gated repository")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", denied)
    with pytest.raises(PermissionError, match="gated"):
        resolve_model_dir("hf://meta-llama/Llama-3-8B")


def test_missing_hub_library_names_the_install_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` raises ImportError
    with pytest.raises(HubError, match=r"needs the huggingface_hub library") as err:
        resolve_model_dir("hf://Qwen/Qwen2.5-0.5B")
    message = str(err.value)
    assert "twinkle-core[hub]" in message and "pip install" in message
