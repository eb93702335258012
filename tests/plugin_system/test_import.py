"""`import twinkle` stays light and has no side effects."""

from __future__ import annotations

import json

from conftest import run_python

HEAVY = (
    *("torch", "transformers", "peft", "ray", "vllm", "megatron", "datasets"),
    *("fastapi", "uvicorn", "tinker", "httpx"),  # the service is twinkle-server; http mode imports httpx on use
    *("numpy", "pydantic"),
)


def test_import_twinkle_imports_nothing_heavy_and_writes_nothing(tmp_path):
    code = f"""
        import json, sys, os, multiprocessing
        before = set(os.listdir('.'))
        import twinkle
        from twinkle import DeviceGroup, DeviceMesh
        import twinkle.model, twinkle.loss, twinkle.dataset, twinkle.data_format
        print(json.dumps({{
            "heavy": [m for m in {HEAVY!r} if m in sys.modules],
            "new_files": sorted(set(os.listdir('.')) - before),
            "start_method": multiprocessing.get_start_method(allow_none=True),
        }}))
    """
    result = run_python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == {"heavy": [], "new_files": [], "start_method": None}


def test_initialize_stays_light_too(tmp_path):
    code = f"""
        import json, sys, warnings
        warnings.simplefilter("ignore")
        import twinkle
        twinkle.initialize(mode="local").shutdown()
        print(json.dumps([m for m in {HEAVY[:-2]!r} if m in sys.modules]))
    """
    result = run_python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_kind_packages_follow_the_module_attribute_protocol():
    """Unknown lowercase attributes raise AttributeError (hasattr, pickle's module scan); unknown
    component-like names keep the registry's ImportError with its hint."""
    import pickle

    import pytest
    import twinkle.dataloader
    import twinkle.model
    from twinkle.registry import ComponentNotFoundError

    assert not hasattr(twinkle.dataloader, "torch")
    assert not hasattr(twinkle.model, "some_helper")
    # pickle looks an object without __module__ up in every imported module (torch.compile's cache does this)
    assert pickle.whichmodule(object(), "torch") == "__main__"
    with pytest.raises(ComponentNotFoundError, match="Registered model names"):
        from twinkle.model import NoSuchModel  # noqa: F401
