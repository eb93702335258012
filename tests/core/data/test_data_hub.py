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
