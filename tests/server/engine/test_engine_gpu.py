"""On a CUDA GPU the engine (a bf16 core ``TransformersModel``) trains, samples and saves like the CPU engine (fp32).

CUDA-vs-CPU comparisons allow bf16's error: 8 mantissa bits (one rounding 2**-8 ~ 4e-3 relative),
compounded over the 4 layers forward and back, stays within ~2e-2 for logprobs, losses, norms and
each gradient tensor (relative to its norm). Adam's first step moves every element by about
``lr * sign(grad)`` whatever the gradient's size, so adapters after the step are compared element
by element against that arithmetic: an element whose gradient stands clear of the gradient's bf16
error takes the same step on both devices (they differ by the bf16 roundings of the update); an
element whose gradient is within that error may take the other sign's step (2 * lr apart at most).

Every test carries the ``gpu`` marker (skipped where torch sees no GPU). Nothing here imports
fastapi, uvicorn or tinker: GPU images may lack the http extra, and the engine does not need it.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from twinkle_server.engine import (  # noqa: E402
    ADAPTER_WEIGHTS,
    OPTIMIZER_STATE,
    BatchJob,
    Datum,
    LoRAEngine,
)

pytestmark = pytest.mark.gpu

#: Adam's eps large enough that a gradient differing in its last bits between devices cannot flip an update's sign.
HYPER = {"learning_rate": 1e-2, "eps": 1e-6}
#: see the module docstring.
BF16_RTOL = 2e-2


def _jobs(first: int, second: int) -> list[BatchJob]:
    """One batch with rows of both slots: two cross-entropy datums of one, a ppo datum of the other."""
    return [
        BatchJob(
            first,
            [
                Datum([5, 6, 7, 8, 9, 10, 11], {"target_tokens": [6, 7, 8, 9, 10, 11, 12]}),
                Datum([20, 21, 22], {"target_tokens": [21, 22, 23], "weights": [1.0, 0.0, 1.0]}),
            ],
        ),
        BatchJob(
            second,
            [
                Datum(
                    [30, 31, 32, 33],
                    {"target_tokens": [31, 32, 33, 34], "logprobs": [-8.0] * 4, "advantages": [1.0, -1.0, 0.5, 2.0]},
                )
            ],
            loss_fn="ppo",
        ),
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The engine tests' tiny model directory with seeded float32 weights written into it.

    Both engines load the same numbers (the CUDA one rounds them to bf16). A config-only directory
    would be initialized randomly per engine, in each engine's dtype, and a bf16 initialization
    need not draw the float32 one's numbers: on the GPU image (torch 2.11, transformers 5.17) the
    two engines' base models differed, so every logprob differed by up to 0.3 whatever patch was
    switched off (``benchmarks/results/service_engine-20261208-0440-h100.md``).
    """
    from twinkle.model.hf import build_causal_lm
    from twinkle.testing import write_tiny_model_dir

    directory = write_tiny_model_dir(tmp_path_factory.mktemp("engine-gpu-model"))
    build_causal_lm(directory, None, dtype=torch.float32, seed=0).save_pretrained(directory)
    return directory


def _engine(model_dir: str, device: str) -> tuple[LoRAEngine, int, int]:
    engine = LoRAEngine(model_dir, max_adapters=6, max_rank=8, seed=0, device=device)
    first = engine.create_slot(4, seed=1)
    second = engine.create_slot(8, seed=2, targets=("q_proj", "v_proj", "down_proj", "lm_head"))
    return engine, first, second


@pytest.fixture(scope="module")
def trained(model_dir: str) -> dict[str, tuple]:
    """A CUDA engine (bf16 base) and a CPU engine (fp32), same seed, each after one pass of two slots and a step."""
    out = {}
    for device in ("cuda", "cpu"):
        engine, first, second = _engine(model_dir, device)
        results = engine.forward_backward(_jobs(first, second))
        grads = {
            slot: [p.grad.detach().double().cpu().clone() for p in engine.slot(slot).parameters()]
            for slot in (first, second)
        }
        before = {
            slot: [p.detach().double().cpu().clone() for p in engine.slot(slot).parameters()]
            for slot in (first, second)
        }
        steps = engine.optim_steps([(first, HYPER), (second, dict(HYPER, grad_clip_norm=0.5))])
        out[device] = (engine, first, second, results, steps, grads, before)
    return out


def test_cuda_engine_puts_base_adapters_and_optimizer_state_on_the_gpu(trained) -> None:
    engine, first, second, *_ = trained["cuda"]
    assert engine.device == torch.device("cuda", torch.cuda.current_device())
    assert all(p.device == engine.device for p in engine.base_parameters.values())
    assert all(p.dtype == torch.bfloat16 for p in engine.base_parameters.values())
    for slot_id in (first, second):
        slot = engine.slot(slot_id)
        assert slot.parameters() and all(t.device == engine.device for t in slot.parameters())
        moments = [v for state in slot.optimizer.state.values() for k, v in state.items() if k != "step"]
        assert moments and all(t.device == engine.device for t in moments)


def test_cuda_and_cpu_engines_agree_on_one_batched_step_of_two_slots(trained) -> None:
    _, _, _, gpu_results, gpu_steps, _, _ = trained["cuda"]
    _, _, _, cpu_results, cpu_steps, _, _ = trained["cpu"]
    for gpu, cpu in zip(gpu_results, cpu_results, strict=True):
        assert gpu.error is None and cpu.error is None
        np.testing.assert_allclose(gpu.metrics["loss:sum"], cpu.metrics["loss:sum"], rtol=BF16_RTOL)
        for g, c in zip(gpu.outputs, cpu.outputs, strict=True):
            assert g.keys() == c.keys() and "logprobs" in g
            for key in g:
                assert isinstance(g[key], np.ndarray) and g[key].dtype == np.float32
                np.testing.assert_allclose(g[key], c[key], rtol=BF16_RTOL, atol=BF16_RTOL, err_msg=key)
    for gpu, cpu in zip(gpu_steps, cpu_steps, strict=True):
        assert gpu["step"] == cpu["step"] == 1.0
        assert isinstance(gpu["grad_norm"], float) and gpu["grad_norm"] > 0
        np.testing.assert_allclose(gpu["grad_norm"], cpu["grad_norm"], rtol=BF16_RTOL)


def test_cuda_and_cpu_gradients_agree_before_the_step(trained) -> None:
    gpu_engine, g1, g2, _, _, gpu_grads, _ = trained["cuda"]
    _, c1, c2, _, _, cpu_grads, _ = trained["cpu"]
    for g, c in ((g1, c1), (g2, c2)):
        assert len(gpu_grads[g]) == len(cpu_grads[c]) == len(gpu_engine.slot(g).parameters())
        for gg, cg in zip(gpu_grads[g], cpu_grads[c], strict=True):
            assert float((gg - cg).norm()) <= BF16_RTOL * float(cg.norm()) + 1e-30


def test_cuda_and_cpu_adapters_agree_after_the_step(trained) -> None:
    gpu_engine, g1, g2, _, _, gpu_grads, gpu_before = trained["cuda"]
    cpu_engine, c1, c2, _, _, cpu_grads, cpu_before = trained["cpu"]
    lr = HYPER["learning_rate"]
    unit = 2.0**-8  # bf16's unit roundoff (8 significant bits): rounding to nearest moves a value by <= unit * |value|
    for g, c in ((g1, c1), (g2, c2)):
        gpu_params, cpu_params = gpu_engine.slot(g).parameters(), cpu_engine.slot(c).parameters()
        assert len(gpu_params) == len(cpu_params)
        for i, (gp, cp) in enumerate(zip(gpu_params, cpu_params, strict=True)):
            gp, cp = gp.detach().double().cpu(), cp.detach().double()
            # the starting points agree to the parameter's rounding (the same seeded init)
            start_bound = unit * cpu_before[c][i].abs() + 1e-12
            assert bool(((gpu_before[g][i] - cpu_before[c][i]).abs() <= start_bound).all())
            # Adam's first step is -lr * m / (sqrt(v) + eps) = -lr * grad / (|grad| + eps): lr-sized
            grad = cpu_grads[c][i]
            step_cpu, step_gpu = cp - cpu_before[c][i], gp - gpu_before[g][i]
            assert bool((step_cpu.abs() <= lr * (1 + 1e-6)).all())
            # a gradient clear of its bf16 error (BF16_RTOL of the tensor's largest) has one sign on both devices
            clear = grad.abs() > BF16_RTOL * grad.abs().max()
            # the bf16 engine's update: its moments and step are bf16 values (m, v, sqrt, divide, bias
            # corrections, lr, the add: at most 12 roundings of an lr-sized step) and the new parameter rounds once
            rounding = unit * cp.abs() + 12 * unit * lr
            assert bool(((step_gpu - step_cpu).abs()[clear] <= rounding[clear] + 1e-3 * lr).all()), i
            # any other element is at most the two opposite steps apart
            assert bool(((gp - cp).abs() <= 2 * lr + rounding + unit * cp.abs()).all()), i
    # the step moved B away from zero (the comparison above is not of two untouched initialisations)
    assert any(bool(b.detach().abs().sum() > 0) for _, b in gpu_engine.slot(g1).params.values())


def test_save_on_cuda_writes_cpu_tensors_and_load_restores_the_adapter_on_cuda(trained, tmp_path) -> None:
    from safetensors import safe_open

    engine, first, *_ = trained["cuda"]
    engine.save_slot(first, tmp_path, optimizer=True, base_model="tiny")
    with safe_open(str(tmp_path / ADAPTER_WEIGHTS), framework="pt") as fh:
        assert len(list(fh.keys())) == 2 * len(engine.slot(first).params)
    # torch.load keeps the device a tensor was saved from: every optimizer tensor must come back on the CPU
    saved = torch.load(tmp_path / OPTIMIZER_STATE, weights_only=True)
    saved_tensors = [v for state in saved["state"].values() for v in state.values() if isinstance(v, torch.Tensor)]
    assert saved_tensors and all(t.device.type == "cpu" for t in saved_tensors)

    loaded = engine.load_slot(tmp_path, optimizer=True)
    try:
        original, restored = engine.slot(first), engine.slot(loaded)
        assert restored.steps == original.steps == 1
        for a, b in zip(original.parameters(), restored.parameters(), strict=True):
            assert b.device == engine.device and b.requires_grad
            assert torch.equal(a.detach(), b.detach())
        for a, b in zip(original.parameters(), restored.parameters()):
            mine, theirs = original.optimizer.state[a], restored.optimizer.state[b]
            assert theirs["exp_avg"].device == engine.device
            assert torch.equal(mine["exp_avg"], theirs["exp_avg"])
            assert torch.equal(mine["exp_avg_sq"], theirs["exp_avg_sq"])
        # the restored slot trains on: the same batch gives the same loss as the original slot
        [again] = engine.forward_backward([BatchJob(loaded, _jobs(first, first)[0].datums, forward_only=True)])
        [orig] = engine.forward_backward([BatchJob(first, _jobs(first, first)[0].datums, forward_only=True)])
        np.testing.assert_allclose(again.metrics["loss:sum"], orig.metrics["loss:sum"], rtol=1e-6)
        assert engine.optim_step(loaded, **HYPER)["step"] == 2.0
    finally:
        engine.free_slot(loaded)


def test_sampling_on_cuda_returns_valid_tokens_and_is_seeded(trained) -> None:
    engine, first, *_ = trained["cuda"]
    cpu_engine, cpu_first, *_ = trained["cpu"]
    prompt = [5, 6, 7, 8]
    samples, prompt_lps = engine.sample(
        first, prompt, num_samples=3, max_tokens=6, seed=7, stop_token_ids=[], prompt_logprobs=True
    )
    assert len(samples) == 3
    for tokens, logprobs, reason in samples:
        assert reason == "length" and len(tokens) == len(logprobs) == 6
        assert all(type(t) is int and 0 <= t < engine.vocab_size for t in tokens)
        assert all(type(lp) is float and np.isfinite(lp) and lp <= 0 for lp in logprobs)
    again, _ = engine.sample(first, prompt, num_samples=3, max_tokens=6, seed=7, stop_token_ids=[])
    assert [s[0] for s in again] == [s[0] for s in samples]
    # prompt logprobs need no random draw: they match the CPU engine's
    _, cpu_prompt_lps = cpu_engine.sample(cpu_first, prompt, max_tokens=1, prompt_logprobs=True)
    assert np.isnan(prompt_lps[0]) and np.isnan(cpu_prompt_lps[0])
    np.testing.assert_allclose(prompt_lps[1:], cpu_prompt_lps[1:], rtol=BF16_RTOL)
    # a stop token ends a sample early and is kept
    greedy, _ = engine.sample(first, prompt, max_tokens=6, temperature=0, stop_token_ids=[])
    stop = greedy[0][0][0]
    [(tokens, logprobs, reason)], _ = engine.sample(first, prompt, max_tokens=6, temperature=0, stop_token_ids=[stop])
    assert (tokens, reason) == ([stop], "stop") and len(logprobs) == 1


def test_the_engines_core_model_is_the_bf16_base_on_cuda(model_dir: str) -> None:
    engine = LoRAEngine(model_dir, max_adapters=2, max_rank=8, seed=0)  # "auto": CUDA here
    assert engine.core.device == engine.device
    hf = engine.core.model.get_base_model()
    for name, param in hf.named_parameters(remove_duplicate=False):
        if "lora_" not in name:
            assert param.dtype == torch.bfloat16 and param.device == engine.device, name
    assert engine.trainable_base_weights() == []


def test_a_twinkle_adapter_on_the_cuda_core_model_trains_and_leaves_the_base_alone(model_dir: str) -> None:
    # what the twinkle API does on a GPU server: its objects' adapters live on the engine's model
    pytest.importorskip("peft")
    from peft import LoraConfig
    from twinkle.testing import random_token_rows

    engine = LoRAEngine(model_dir, max_adapters=2, max_rank=8, seed=0, device="cuda")
    slot = engine.create_slot(4, seed=3)
    job = _jobs(slot, slot)[0]
    [before] = engine.forward_backward([BatchJob(slot, job.datums, forward_only=True)])
    base_before = {name: p.detach().clone() for name, p in engine.base_parameters.items()}

    model = engine.core
    model.add_adapter_to_model("mine", LoraConfig(r=4, lora_alpha=32, target_modules="all-linear"))
    model.set_optimizer("AdamW", lr=1e-2, adapter_name="mine")
    for _ in range(2):
        model.forward_backward(inputs=random_token_rows(4, seed=5), adapter_name="mine")
        model.clip_grad_and_step(adapter_name="mine")

    assert engine.trainable_base_weights() == []
    for name, param in engine.base_parameters.items():
        assert torch.equal(param, base_before[name]), name
    [after] = engine.forward_backward([BatchJob(slot, job.datums, forward_only=True)])
    for a, b in zip(before.outputs, after.outputs, strict=True):
        np.testing.assert_array_equal(a["logprobs"], b["logprobs"])
