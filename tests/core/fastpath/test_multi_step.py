"""clip_grad_and_step_multi: several adapters' clip + optimizer steps with one host synchronization.

Each adapter must end exactly where ``model.clip_grad_and_step(adapter_name=...)`` leaves it:
the same per-tensor norms reduced in the same order, the same clip factor expression, the same
optimizer, so the weights, optimizer state and answers are bit-identical (``torch.equal``).
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from twinkle.model.multi_adapter import clip_grad_and_step_multi  # noqa: E402
from twinkle.model.transformers_model import TransformersModel  # noqa: E402

#: different ranks and target sets; lrs and clipping bounds differ per adapter below
TENANTS = [
    ("alice", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}),
    ("bob", {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ("carol", {"r": 2, "lora_alpha": 4, "target_modules": ["o_proj", "up_proj"]}),
    ("dave", {"r": 4, "lora_alpha": 4, "target_modules": ["k_proj"]}),
]
#: alice and carol share lr and weight decay: one fused AdamW call for both (with fused=True)
LRS = {"alice": 1e-3, "bob": 3e-3, "carol": 1e-3, "dave": 2e-4}
BOUNDS = {"alice": 1.0, "bob": 1e3, "carol": 0.01}  # dave: the default max_grad_norm


def _model(config, device="cpu", dtype=None, skip_nonfinite=False, fused=None):
    model = TransformersModel(config=config, device=device, seed=3, torch_dtype=dtype)
    model.skip_nonfinite_steps = skip_nonfinite
    extra = {} if fused is None else {"fused": fused}
    for name, lora in TENANTS:
        model.add_adapter_to_model(name, {**lora, "init_lora_weights": False})
        model.set_optimizer("AdamW", lr=LRS[name], weight_decay=0.01 * len(name), adapter_name=name, **extra)
    return model


def _fill_grads(model, step, poison=None):
    """Gradient sums of a window as forward_backward leaves them (grads, micro_step, window_tokens)."""
    gen = torch.Generator().manual_seed(100 + step)
    for i, (name, _) in enumerate(TENANTS):
        state = model.state_of(name)
        for p in state.params:
            g = torch.randn(p.shape, generator=gen) * 10.0 ** (i - 1)  # some adapters clipped, some not
            if name == poison:
                g.view(-1)[0] = float("nan")
            p.grad = g.to(p.device, p.dtype)
        state.micro_step = 1
        state.window_tokens = float(7 + 3 * i)
        state.last_loss = (1.0, state.window_tokens)


def _snapshot(model):
    out = {}
    for name, _ in TENANTS:
        state = model.state_of(name)
        out[name] = [p.detach().clone() for p in state.params]
        for p in state.params:
            for _key, value in sorted(state.optimizer.state.get(p, {}).items()):
                out[name].append(value.detach().clone() if hasattr(value, "clone") else torch.tensor(value))
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert len(a[name]) == len(b[name])
        for x, y in zip(a[name], b[name]):
            assert torch.equal(x, y), name


def _run(model, batched, steps=3, poison_at=None):
    answers = []
    for step in range(steps):
        _fill_grads(model, step, poison="carol" if step == poison_at else None)
        names = [name for name, _ in TENANTS]
        if batched:
            got = clip_grad_and_step_multi(model, names, max_grad_norm=2.0, max_grad_norms=BOUNDS)
        else:
            got = {name: model.clip_grad_and_step(BOUNDS.get(name, 2.0), adapter_name=name) for name in names}
        answers.append(got)
    return answers


def _assert_same_answers(got, want):
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].keys() == b[name].keys()
            for key in a[name]:
                x, y = a[name][key], b[name][key]
                assert x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)), (name, key, x, y)


@pytest.mark.parametrize("fused", [None, True])
def test_batched_step_is_bit_identical_to_per_adapter_steps(tiny_config, fused, monkeypatch):
    calls = []
    real = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    alone, batched = _model(tiny_config, fused=fused), _model(tiny_config, fused=fused)
    _assert_same(_snapshot(alone), _snapshot(batched))
    want = _run(alone, batched=False)
    got = _run(batched, batched=True)
    _assert_same_answers(got, want)
    assert all(a["stepped"] for answer in got for a in answer.values())
    norms = {name: got[-1][name]["grad_norm"] for name, _ in TENANTS}
    assert norms["alice"] > BOUNDS["alice"] and norms["bob"] < BOUNDS["bob"]  # both clipping cases covered
    _assert_same(_snapshot(batched), _snapshot(alone))
    for name, _ in TENANTS:
        state = batched.state_of(name)
        assert state.global_step == 3 and state.micro_step == 0 and state.window_tokens == 0.0
        assert all(p.grad is None for p in state.params)
    if fused:  # steps 2 and 3 of the batched model: alice + carol in one call, bob and dave one each
        sizes = {name: len(batched.state_of(name).params) for name, _ in TENANTS}
        batched_calls = calls[-6:]
        assert sorted(batched_calls[:3]) == sorted([sizes["alice"] + sizes["carol"], sizes["bob"], sizes["dave"]])


def test_batched_step_skips_a_non_finite_adapter_and_steps_the_others(tiny_config):
    alone, batched = _model(tiny_config, skip_nonfinite=True), _model(tiny_config, skip_nonfinite=True)
    want = _run(alone, batched=False, poison_at=1)
    got = _run(batched, batched=True, poison_at=1)
    _assert_same_answers(got, want)
    assert got[1]["carol"]["stepped"] is False and "not finite" in got[1]["carol"]["skipped"]
    assert got[1]["alice"]["stepped"] is True
    _assert_same(_snapshot(batched), _snapshot(alone))
    assert batched.state_of("carol").global_step == 2 and batched.state_of("alice").global_step == 3


def test_batched_step_mid_window_and_without_optimizer(tiny_config):
    model = _model(tiny_config)
    model.state_of("bob").gradient_accumulation_steps = 2
    _fill_grads(model, 0)
    got = clip_grad_and_step_multi(model, ["alice", "bob"])
    assert got["bob"] == {"stepped": False, "step": 0} and got["alice"]["stepped"] is True
    assert model.state_of("bob").params[0].grad is not None  # its window goes on
    with pytest.raises(ValueError, match="twice"):
        clip_grad_and_step_multi(model, ["alice", "alice"])


@pytest.mark.gpu
def test_gpu_batched_step_is_bit_identical_to_per_adapter_steps(tiny_config):
    alone = _model(tiny_config, device="cuda", dtype="bfloat16")
    batched = _model(tiny_config, device="cuda", dtype="bfloat16")
    want = _run(alone, batched=False)
    got = _run(batched, batched=True)
    _assert_same_answers(got, want)
    _assert_same(_snapshot(batched), _snapshot(alone))
