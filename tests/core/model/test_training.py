"""TransformersModel training numbers: accumulation, adapters, losses, metrics, registry names."""

from __future__ import annotations

import pytest
import torch
import twinkle
from model_test_utils import make_rows
from peft import LoraConfig
from twinkle.loss.base import Loss, LossOutput, token_logps
from twinkle.model.transformers_model import TransformersModel
from twinkle.registry import ComponentNotFoundError

LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


def _trainable(model: TransformersModel, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    state = model.state_of(adapter_name)
    names = {id(p): n for n, p in model.model.named_parameters()}
    return {names[id(p)]: p.detach().clone() for p in state.params}


def test_from_config_dict_and_model_dir_give_the_same_seeded_weights(tiny_model_dir):
    import json
    from pathlib import Path

    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    a = TransformersModel(config=config, seed=7)
    b = TransformersModel(model_id=tiny_model_dir, seed=7)
    c = TransformersModel(model_id=tiny_model_dir, seed=8)
    wa, wb, wc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(wa[key], wb[key])
    assert not torch.equal(wa[key], wc[key])


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_gradient_accumulation_equals_one_big_batch(tiny_model_dir, use_lora):
    rows = make_rows(8, seed=1)
    results = []
    for gas, chunks in ((1, [rows]), (3, [rows[:1], rows[1:6], rows[6:]])):
        model = TransformersModel(model_id=tiny_model_dir, seed=0)
        if use_lora:
            model.add_adapter_to_model("default", LORA, gradient_accumulation_steps=gas)
        else:
            model.state_of().gradient_accumulation_steps = gas
        model.set_optimizer("SGD", lr=0.5)
        losses = []
        for chunk in chunks:
            model.forward_backward(inputs=chunk)
            out = model.clip_grad_and_step(max_grad_norm=1e9)
        assert out["stepped"] and out["step"] == 1
        metric = model.calculate_metric()
        losses.append(metric["loss"])
        results.append((out["grad_norm"], metric["loss"], _trainable(model)))
    (norm1, loss1, params1), (norm3, loss3, params3) = results
    assert norm3 == pytest.approx(norm1, rel=1e-5)
    assert loss3 == pytest.approx(loss1, rel=1e-6)
    for name, value in params1.items():
        torch.testing.assert_close(params3[name], value, rtol=1e-5, atol=1e-6)


def test_lora_sft_loss_falls_and_only_adapter_weights_change(tiny_model_dir):
    model = TransformersModel(model_id=tiny_model_dir)
    base_before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    model.add_adapter_to_model("default", LoraConfig(r=8, lora_alpha=32, target_modules="all-linear"))
    model.set_optimizer("AdamW", lr=1e-2)
    model.set_lr_scheduler("LinearWarmupScheduler", num_warmup_steps=1, num_training_steps=30)
    rows = make_rows(4, seed=2)
    losses = []
    for _ in range(30):
        losses.append(model.forward_backward(inputs=rows).loss)
        model.clip_grad_and_step()
    assert losses[-1] < losses[0] - 1.0
    metric = model.calculate_metric()
    assert set(metric) >= {"step", "loss", "grad_norm", "lr", "tokens_per_s", "token_acc"}
    assert metric["step"] == 30 and metric["tokens_per_s"] > 0
    base = model.model.get_base_model()
    for name, p in base.named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, base_before[key]), name


def test_adapters_are_independent(tiny_model_dir):
    model = TransformersModel(model_id=tiny_model_dir)
    model.add_adapter_to_model("alpha", LORA)
    model.add_adapter_to_model("beta", LORA, gradient_accumulation_steps=2)
    assert model.adapter_names == ["alpha", "beta"]
    assert model.state_of().name == "beta"  # the last added is the default
    model.set_optimizer("AdamW", lr=1e-2, adapter_name="alpha")
    model.set_optimizer("SGD", lr=1e-1, adapter_name="beta")
    model.set_loss("CrossEntropyLoss", adapter_name="alpha", label_smoothing=0.1)
    assert type(model.state_of("alpha").optimizer).__name__ == "AdamW"
    assert model.state_of("beta").loss is not model.state_of("alpha").loss
    b_before = _trainable(model, "beta")
    rows = make_rows(4, seed=4)
    before = model.forward_only(rows, adapter_name="alpha").loss
    for _ in range(5):
        model.forward_backward(inputs=rows, adapter_name="alpha")
        model.clip_grad_and_step(adapter_name="alpha")
    assert model.forward_only(rows, adapter_name="alpha").loss < before
    for name, value in _trainable(model, "beta").items():
        assert torch.equal(value, b_before[name]), name
    # b accumulates its own window of two
    model.forward_backward(inputs=rows, adapter_name="beta")
    assert model.clip_grad_and_step(adapter_name="beta")["stepped"] is False
    model.forward_backward(inputs=rows, adapter_name="beta")
    assert model.clip_grad_and_step(adapter_name="beta")["stepped"] is True
    assert model.state_of("alpha").global_step == 5 and model.state_of("beta").global_step == 1
    with pytest.raises(KeyError, match="no adapter named 'c'"):
        model.forward_backward(inputs=rows, adapter_name="c")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter_to_model("alpha", LORA)
    model.remove_adapter("beta")
    assert model.adapter_names == ["alpha"] and model.state_of().name == "alpha"
    assert not any(".beta." in n for n, _ in model.model.named_parameters())
    with pytest.raises(ValueError, match="only adapter"):
        model.remove_adapter("alpha")


def test_forward_only_logps_and_disabled_adapters(tiny_model_dir):
    model = TransformersModel(model_id=tiny_model_dir)
    rows = make_rows(3, seed=5)
    base = model.forward_only(rows)
    model.add_adapter_to_model("default", LORA)
    tuned = model.forward_only(rows)
    ref = model.forward_only(rows, disable_adapters=True)
    with model.adapters_disabled():
        ref2 = model.forward_only(rows)
    for row, lp_base, lp_tuned, lp_ref, lp_ref2 in zip(rows, base.logps, tuned.logps, ref.logps, ref2.logps):
        assert len(lp_base) == len(row["input_ids"])
        assert all(v == 0.0 for v, label in zip(lp_base, row["labels"]) if label == -100)
        assert lp_ref == pytest.approx(lp_base, abs=1e-5)
        assert lp_ref2 == pytest.approx(lp_base, abs=1e-5)
        assert lp_tuned != pytest.approx(lp_base, abs=1e-5)
    # logps sum to minus the loss
    total = -sum(sum(lp) for lp in base.logps)
    assert total / base.num_tokens == pytest.approx(base.loss, rel=1e-5)


def test_forward_only_takes_a_batch_of_tensors(tiny_model_dir):
    """A collated {input_ids, labels} batch (no processor row ids): one sequence per row, as from rows."""
    model = TransformersModel(model_id=tiny_model_dir)
    rows = make_rows(2, seed=6)
    length = min(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"][:length] for r in rows])
    out = model.forward_only({"input_ids": ids, "labels": ids.clone()})
    want = model.forward_only([{"input_ids": r, "labels": r} for r in ids.tolist()])
    assert [len(lp) for lp in out.logps] == [length, length]
    assert out.logps == [pytest.approx(lp, abs=1e-5) for lp in want.logps]
    assert out.loss == pytest.approx(want.loss, rel=1e-5) and out.num_tokens == want.num_tokens
    masked = model.forward_only({"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)})
    assert masked.logps == [pytest.approx(lp, abs=1e-5) for lp in want.logps]


class RecordingLoss(Loss):
    """An advantage-weighted NLL that records what reached it."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def __call__(self, inputs, outputs):
        self.seen.append({k: v for k, v in inputs.items() if k in ("advantages", "old_logps")})
        mask = inputs["shift_labels"] != -100
        logps = token_logps(inputs, outputs)
        loss = -(logps * inputs["advantages"] * mask).sum()
        return LossOutput(loss=loss, num_tokens=int(mask.sum()), extra={"adv_mean": float(inputs["advantages"].mean())})


def test_extra_row_fields_reach_the_loss(tiny_model_dir):
    model = TransformersModel(model_id=tiny_model_dir)
    model.add_adapter_to_model("default", LORA)
    loss = RecordingLoss()
    model.set_loss(loss)
    rows = make_rows(2, seed=6)
    old = model.forward_only(rows).logps
    rows = [{**row, "old_logps": lp} for row, lp in zip(rows, old)]
    out = model.forward_backward(inputs=rows, advantages=[1.0, -1.0])
    seen = loss.seen[-1]
    assert seen["advantages"][0, 0] == 1.0 and seen["advantages"][1, 0] == -1.0
    # old_logps arrive shifted, aligned with shift_labels
    assert seen["old_logps"][0, 0].item() == pytest.approx(old[0][1])
    assert "adv_mean" in out


def test_names_resolve_through_the_registry_and_errors_help(tiny_model_dir):
    model = TransformersModel(model_id=tiny_model_dir)
    with pytest.raises(ComponentNotFoundError, match="AdamW"):
        model.set_optimizer("AdamWW", lr=1e-3)
    with pytest.raises(ValueError, match="call set_optimizer"):
        model.set_lr_scheduler("CosineWarmupScheduler", num_training_steps=3)
    with pytest.raises(ValueError, match="has no optimizer"):
        model.forward_backward(inputs=make_rows(1))
        model.step()
    model.set_optimizer(torch.optim.SGD, lr=0.1)
    model.set_lr_scheduler("StepLR", step_size=1, gamma=0.5)
    model.zero_grad()
    model.forward_backward(inputs=make_rows(1))
    model.clip_grad_and_step()
    assert model.state_of().optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="exactly one of"):
        TransformersModel()
    with pytest.raises((FileNotFoundError, ValueError), match="local"):
        TransformersModel(model_id="/no/such/dir")


def test_metrics_are_emitted_to_plugins(tiny_model_dir):
    seen = []

    class Recorder:
        @twinkle.hookimpl
        def twinkle_metrics_emitted(self, runtime, source, step, metrics):
            seen.append((source, step, dict(metrics)))

    from twinkle.testing import registered_plugin

    with registered_plugin(Recorder(), name="recorder", seed=1):
        model = TransformersModel(model_id=tiny_model_dir)
        model.set_optimizer("AdamW", lr=1e-3)
        model.forward_backward(inputs=make_rows(2))
        model.clip_grad_and_step()
        metric = model.calculate_metric(is_training=True)
        model.forward_only(make_rows(2))
        model.calculate_metric(is_training=False)
    assert seen[0] == ("train", 1, metric)
    assert seen[1][0] == "eval" and "loss" in seen[1][2]


def test_mixed_precision_and_dtype(tiny_model_dir):
    rows = make_rows(2, seed=8)
    fp32 = TransformersModel(model_id=tiny_model_dir).forward_only(rows).loss
    autocast = TransformersModel(model_id=tiny_model_dir, mixed_precision="bf16")
    autocast.set_optimizer("AdamW", lr=1e-3)
    assert autocast.forward_backward(inputs=rows).loss == pytest.approx(fp32, rel=2e-2)
    assert autocast.clip_grad_and_step()["stepped"]
    assert next(autocast.model.parameters()).dtype == torch.float32
    bf16 = TransformersModel(model_id=tiny_model_dir, torch_dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert bf16.forward_only(rows).loss == pytest.approx(fp32, rel=2e-2)
    with pytest.raises(ValueError, match="mixed_precision"):
        TransformersModel(model_id=tiny_model_dir, mixed_precision="fp8")


@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e9], ids=["clipped", "unclipped"])
def test_one_pass_scale_and_clip_equals_torch_two_passes(tiny_model_dir, max_grad_norm):
    """clip_grad_and_step folds 1/tokens into the clip factor; torch's scale-then-clip_grad_norm_ is the reference."""
    rows = make_rows(4, seed=3)
    model = TransformersModel(model_id=tiny_model_dir, seed=0)
    model.add_adapter_to_model("default", LORA)
    model.set_optimizer("SGD", lr=1.0)
    reference = TransformersModel(model_id=tiny_model_dir, seed=0)
    reference.add_adapter_to_model("default", LORA)
    model.forward_backward(inputs=rows)
    reference.forward_backward(inputs=rows)
    state = reference.state_of()
    grads = [p.grad for p in state.params if p.grad is not None]
    torch._foreach_mul_(grads, 1.0 / state.window_tokens)
    want_norm = float(torch.nn.utils.clip_grad_norm_(state.params, max_grad_norm))
    want = [p.detach() - p.grad for p in state.params]  # SGD lr=1 with the reference's clipped gradients
    result = model.clip_grad_and_step(max_grad_norm=max_grad_norm)
    assert result["grad_norm"] == pytest.approx(want_norm, rel=1e-6)
    for got, expected in zip(model.state_of().params, want):
        torch.testing.assert_close(got.detach(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("how", ["clip_grad_and_step", "step"])
def test_skip_nonfinite_steps_leaves_adapter_optimizer_and_schedule_unchanged(tiny_model_dir, how):
    """With skip_nonfinite_steps a NaN gradient drops the window and changes nothing; without it the NaN lands."""
    rows = make_rows(4, seed=2)
    model = TransformersModel(model_id=tiny_model_dir, seed=0)
    model.add_adapter_to_model("default", LORA)
    model.set_optimizer("AdamW", lr=1e-2)
    model.skip_nonfinite_steps = True
    model.forward_backward(inputs=rows)
    assert model.clip_grad_and_step()["stepped"]
    state = model.state_of()
    before = _trainable(model)
    moments = {k: v.clone() for k, v in state.optimizer.state[state.params[0]].items()}
    model.forward_backward(inputs=rows)
    state.params[0].grad[0, 0] = float("nan")  # one poisoned gradient entry
    if how == "clip_grad_and_step":
        out = model.clip_grad_and_step()
        assert out["stepped"] is False and "not finite" in out["skipped"] and out["step"] == 1
    else:
        model.step()
        model.zero_grad()
    for name, value in _trainable(model).items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    for name, value in moments.items():
        torch.testing.assert_close(state.optimizer.state[state.params[0]][name], value, rtol=0, atol=0)
    metric = model.calculate_metric()
    assert metric["step"] == 1 and metric["skipped_steps"] == 1
    # the next window trains normally
    model.forward_backward(inputs=rows)
    assert model.clip_grad_and_step()["stepped"]
    assert all(torch.isfinite(v).all() for v in _trainable(model).values())

    model.skip_nonfinite_steps = False  # the default: the step is taken and the NaN reaches the adapter
    model.forward_backward(inputs=rows)
    state.params[0].grad[0, 0] = float("nan")
    assert model.clip_grad_and_step()["stepped"]
    assert not all(torch.isfinite(v).all() for v in _trainable(model).values())
