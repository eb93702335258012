"""One engine for both APIs: a Tinker run trained in shared passes equals core's ``TransformersModel`` alone.

The service's engine is a core ``TransformersModel`` whose adapters are the tenants; these tests pin
that a tenant's numbers do not depend on who shares its passes, that the twinkle API's objects
live on the same model, and that no tenant operation changes the base weights.
"""

from __future__ import annotations

import hashlib
import uuid

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

BASE = "twinkle/tiny-qwen2"
STEPS = 3
#: Norm-wise relative tolerance, fp32 on the CPU. The engine packs this tenant's rows after another
#: tenant's into one varlen row and adds its LoRA per segment; the reference runs the rows alone,
#: padded, with peft's own LoRA forward. The same sums are taken in another order/blocking: each
#: fp32 dot product of K <= 256 terms carries a relative rounding error of about sqrt(K) * 2**-24
#: ~ 1e-6, and 4 layers forward and back compound a few of those (~5e-6 at worst for the losses and
#: gradients). Adam divides m by sqrt(v) per element, which keeps the gradients' relative error in the
#: update (it does not amplify it), and the weights move by lr-sized steps from the same start. The
#: comparison is of whole tensors (||x - y|| / ||y||): single elements near zero have no meaningful
#: relative error. A mix-up of tenants or rows would differ by O(1).
RTOL = 1e-5
#: On CUDA both sides compute with a bf16 base: 8 mantissa bits, one rounding ~ 2**-8 ~ 4e-3 relative,
#: and the two sides round different partial sums (other kernels, other blocking); a few layers forward
#: and back compound that to ~1e-2. Allowed: 5e-2 (a tenant mix-up is still O(1)).
BF16_RTOL = 5e-2


def _rel(x, y) -> float:
    x = torch.as_tensor(x).detach().cpu().to(torch.float64)
    y = torch.as_tensor(y).detach().cpu().to(torch.float64)
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


def _rows(datums):
    """Core rows for Tinker datums (the engine's documented convention: labels are the targets, shifted)."""
    return [{"input_ids": list(tokens) + [targets[-1]], "labels": [-100, *targets]} for tokens, targets in datums]


@pytest.mark.parametrize(
    ("device", "rtol"),
    [
        pytest.param("cpu", RTOL, id="cpu-fp32"),
        pytest.param("cuda", BF16_RTOL, id="cuda-bf16", marks=pytest.mark.gpu),
    ],
)
def test_a_tenant_in_shared_passes_trains_as_core_alone(device: str, rtol: float) -> None:
    from peft import LoraConfig
    from twinkle.loss.tinker import TinkerLoss
    from twinkle.model import TransformersModel
    from twinkle_server.config import tiny_model_dir
    from twinkle_server.engine import BatchJob, Datum, LoRAEngine

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    engine = LoRAEngine(tiny_model_dir(), max_adapters=4, max_rank=8, device=device)

    rng = np.random.default_rng(0)
    mine = [(rng.integers(3, 3000, size=n).tolist(), rng.integers(3, 3000, size=n).tolist()) for n in (17, 9)]
    other = [(rng.integers(3, 3000, size=12).tolist(), rng.integers(3, 3000, size=12).tolist())]
    hyper = {"learning_rate": 1e-2}
    a = engine.create_slot(4, seed=11)  # all targets, lm_head included
    b = engine.create_slot(8, seed=12, targets=("q_proj", "v_proj", "down_proj"))  # another rank and target set
    reference = TransformersModel(
        model_id=str(engine.model_dir),
        device=device,
        seed=0,
        torch_dtype="bfloat16" if device == "cuda" else "float32",
    )
    try:
        slot = engine.slot(a)
        reference.add_adapter_to_model(
            "alone", LoraConfig(r=4, lora_alpha=32, lora_dropout=0.0, target_modules=list(slot.targets))
        )
        ref_params = dict(reference.model.named_parameters())
        with torch.no_grad():  # the same start: copy the engine's initial adapter
            for module, (lora_a, lora_b) in slot.params.items():
                ref_params[f"base_model.model.{module}.lora_A.alone.weight"].copy_(lora_a)
                ref_params[f"base_model.model.{module}.lora_B.alone.weight"].copy_(lora_b)
        reference.set_loss(TinkerLoss("cross_entropy", normalize=False), adapter_name="alone")
        reference.set_optimizer("AdamW", adapter_name="alone", lr=1e-2, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
        by_name = {n.replace(".alone.", ".X."): p for n, p in reference.model.named_parameters() if ".alone." in n}
        mine_by_name = {
            n.replace(f".{slot.adapter}.", ".X."): p
            for n, p in engine.core.model.named_parameters()
            if f".{slot.adapter}." in n
        }
        assert set(by_name) == set(mine_by_name)
        for step in range(STEPS):
            jobs = [
                BatchJob(a, [Datum(t, {"target_tokens": y}) for t, y in mine]),
                BatchJob(
                    b,
                    [
                        Datum(t, {"target_tokens": y, "logprobs": [-8.0] * len(t), "advantages": [0.5] * len(t)})
                        for t, y in other
                    ],
                    loss_fn="ppo",
                ),
            ]
            got = engine.forward_backward(jobs)
            assert all(r.error is None for r in got)
            got_grads = {n: p.grad.clone() for n, p in mine_by_name.items()}
            engine.optim_steps([(a, hyper), (b, hyper)])

            ref_out = reference.forward_backward(_rows(mine), adapter_name="alone")
            ref_grads = {n: p.grad.clone() for n, p in by_name.items()}
            with torch.no_grad():  # the reference's own per-token logprobs of the targets (before its step)
                ref_logps = []
                for tokens, targets in mine:
                    logits = reference.model(input_ids=torch.tensor([tokens], device=device)).logits[0].float()
                    lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(targets, device=device)[:, None])[:, 0]
                    ref_logps.append(lp.cpu())
            reference.clip_grad_and_step(max_grad_norm=float("inf"), adapter_name="alone")

            assert _rel(got[0].metrics["loss:sum"], ref_out["loss"]) < rtol, step
            for out, lp in zip(got[0].outputs, ref_logps, strict=True):
                assert out["logprobs"].shape == lp.shape
                assert _rel(out["logprobs"], lp) < rtol, step
            for n in by_name:
                assert _rel(got_grads[n], ref_grads[n]) < rtol, (step, n)
            for n, p in by_name.items():
                assert _rel(mine_by_name[n].detach(), p.detach()) < rtol, (step, n)
        # the adapter really trained (B left zero), and the other tenant's pass did not leak into it
        assert all(float(p.detach().abs().max()) > 0 for n, p in mine_by_name.items() if "lora_B" in n)
    finally:
        engine.free_slot(a)
        engine.free_slot(b)


def _base_digest(engine) -> dict[str, str]:
    return {
        name: hashlib.sha256(p.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
        for name, p in engine.base_parameters.items()
    }


def test_tinker_operations_leave_the_base_bit_identical(server) -> None:
    tinker = pytest.importorskip("tinker")
    from tinker import types

    engine = server.state.engine
    service = tinker.ServiceClient(base_url=server.url, api_key=server.add_tenant(f"digest-{uuid.uuid4().hex[:6]}"))
    before = _base_digest(engine)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(list(range(5, 25))),
        loss_fn_inputs={"target_tokens": np.array(list(range(6, 26)))},
    )
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    operations = {
        "forward_backward": lambda: tc.forward_backward([datum], "cross_entropy").result(),
        "optim_step": lambda: tc.optim_step(types.AdamParams(learning_rate=1e-1)).result(),
        "forward": lambda: tc.forward([datum], "cross_entropy").result(),
        "save_state": lambda: tc.save_state("digest").result(),
        "load_state": lambda: tc.load_state_with_optimizer(tc.save_state("digest2").result().path).result(),
        "sample": lambda: (
            tc.save_weights_and_get_sampling_client("digest-s")
            .sample(types.ModelInput.from_ints([5, 6, 7]), 1, types.SamplingParams(max_tokens=4))
            .result()
        ),
    }
    for name, operation in operations.items():
        operation()
        assert _base_digest(engine) == before, f"{name} changed the base weights"
    assert engine.trainable_base_weights() == []
    service.close(status="success")


def test_twinkle_objects_are_adapters_of_the_engines_model(server) -> None:
    import twinkle
    from peft import LoraConfig
    from twinkle.model import TransformersModel
    from twinkle_server.twinkle_host import host

    engine = server.state.engine
    with twinkle.initialize(mode="http", base_url=server.url, api_key=server.add_tenant(f"one-{uuid.uuid4().hex[:6]}")):
        model = TransformersModel(model_id=BASE)
        model.add_adapter_to_model("mine", LoraConfig(r=4, target_modules="all-linear"))
        model.set_optimizer("AdamW", lr=1e-2)
        model.forward_backward(inputs=[{"input_ids": list(range(7, 27))}])
        model.clip_grad_and_step()
        # (inside the session: leaving it deletes the client's objects, and their adapters)
        assert host(server.state).model is engine.core
        scoped = [name for name in engine.core.adapter_names if name.endswith("_mine")]
        assert len(scoped) == 1, engine.core.adapter_names
        assert engine.core.state_of(scoped[0]).global_step == 1
    assert not [name for name in engine.core.adapter_names if name == scoped[0]]
