"""The Tinker engine's ``device`` argument on the CPU: ``"cpu"`` is the default here, bad devices fail clearly.

The CUDA side is in ``test_engine_gpu.py`` (skipped without a GPU).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from twinkle_server.engine import BatchJob, Datum, EngineError, LoRAEngine, resolve_device  # noqa: E402


def _train_once(engine: LoRAEngine) -> tuple[list, list, list]:
    """Two slots in one batched pass (two losses), one optim step each; returns (results, step metrics, adapters)."""
    first = engine.create_slot(4, seed=1)
    second = engine.create_slot(8, seed=2, targets=("q_proj", "v_proj", "lm_head"))
    jobs = [
        BatchJob(first, [Datum([5, 6, 7, 8, 9], {"target_tokens": [6, 7, 8, 9, 10], "weights": [1, 1, 0, 1, 1]})]),
        BatchJob(
            second,
            [
                Datum(
                    [11, 12, 13],
                    {"target_tokens": [12, 13, 14], "logprobs": [-7.0, -8.0, -9.0], "advantages": [1, -1, 0.5]},
                )
            ],
            loss_fn="ppo",
        ),
    ]
    results = engine.forward_backward(jobs)
    steps = engine.optim_steps(
        [(first, {"learning_rate": 1e-2}), (second, {"learning_rate": 1e-2, "grad_clip_norm": 0.1})]
    )
    adapters = [t.detach().clone() for slot in (first, second) for t in engine.slot(slot).parameters()]
    return results, steps, adapters


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default device is CUDA here (test_engine_gpu.py covers it)")
def test_explicit_cpu_engine_matches_the_default_on_a_cpu_machine(model_dir: str) -> None:
    default = LoRAEngine(model_dir, max_adapters=4, max_rank=8)
    explicit = LoRAEngine(model_dir, max_adapters=4, max_rank=8, device="cpu")
    assert default.device == explicit.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in default.base_parameters.values())

    got_default, got_explicit = _train_once(default), _train_once(explicit)
    for mine, theirs in zip(got_default[0], got_explicit[0]):
        assert mine.error is None and theirs.error is None
        assert mine.metrics == theirs.metrics
        for a, b in zip(mine.outputs, theirs.outputs, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].dtype == b[key].dtype
                assert (a[key] == b[key]).all(), key
    assert got_default[1] == got_explicit[1]
    assert got_default[1][0]["grad_norm"] > 0
    for a, b in zip(got_default[2], got_explicit[2], strict=True):
        assert torch.equal(a, b)


def test_auto_picks_cuda_when_available_else_the_cpu() -> None:
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected
    assert resolve_device(None) == expected
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu0", "cuda:x", "", "cpux", "meta"])
def test_a_bad_device_string_names_the_accepted_ones(model_dir: str, bad: str) -> None:
    with pytest.raises(EngineError, match=r"device .*'auto'.*'cpu'.*'cuda'"):
        LoRAEngine(model_dir, device=bad)


def test_a_cuda_device_this_machine_lacks_is_refused(model_dir: str) -> None:
    if torch.cuda.is_available():
        with pytest.raises(EngineError, match=r"CUDA device\(s\)"):
            LoRAEngine(model_dir, device=f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(EngineError, match="torch sees no GPU.*device='cpu'"):
            LoRAEngine(model_dir, device="cuda")


def test_the_engine_imports_without_the_http_extra() -> None:
    # the GPU image has no fastapi/uvicorn/tinker: the engine and its losses must not need them
    code = (
        "import sys\n"
        "for name in ('fastapi', 'uvicorn', 'tinker', 'pydantic'):\n"
        "    sys.modules[name] = None\n"
        "import twinkle_server.engine, twinkle_server.config, twinkle.testing\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_serve_config_and_cli_carry_the_device() -> None:
    import argparse

    from twinkle_server.cli import _config, add_serve_arguments
    from twinkle_server.config import ServerConfig

    assert ServerConfig(state_dir=".").device == "auto"
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert _config(parser.parse_args([])).device == "auto"
    assert _config(parser.parse_args(["--device", "cuda:1"])).device == "cuda:1"


def test_twinkle_serve_with_a_bad_device_prints_an_error(tmp_path, capsys) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")

    from twinkle.cli import main

    assert main(["serve", "--state-dir", str(tmp_path), "--device", "tpu9"]) == 1
    assert "error: unknown device 'tpu9'" in capsys.readouterr().out
