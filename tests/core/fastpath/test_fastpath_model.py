"""TransformersModel with the fast path equals the plain path on CPU (fp32), and patches switch by name."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from fastpath_test_utils import (  # noqa: E402
    FP32_UNIT_ROUNDOFF,
    backward_rtol,
    make_rows,
    optimizer_step_bounds,
    tiny_qwen2_config,
)
from twinkle.model.transformers_model import TransformersModel  # noqa: E402
from twinkle.patch.fastpath import HiddenStatesOutput, get_flag  # noqa: E402

LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0}


def _model(config, patches=None, lora=True, dtype="float32", **kwargs):
    model = TransformersModel(config=config, torch_dtype=dtype, device="cpu", seed=7, patches=patches, **kwargs)
    if lora:
        model.add_adapter_to_model("default", dict(LORA))
    return model


def _grads(model):
    return {i: p.grad.detach().clone() for i, p in enumerate(model.state_of().params) if p.grad is not None}


def _assert_same_training(fast, plain, rows, steps=2, max_grad_norm=1.0):
    """Each step: equal losses and gradients, then equal optimizer updates, within fp32 bounds.

    Every step starts both models from the same weights and optimizer state (the plain model's
    are copied into the fast one after the comparison): Adam's first steps normalize a gradient
    to its sign, so an fp32 rounding difference in a near-zero gradient becomes an lr-sized
    step either way, and free-running models drift apart for reasons that are not the fast
    path's. The tolerances come from the arithmetic (``backward_rtol``,
    ``optimizer_update_bound``), not from one machine.
    """
    config = plain.model.config
    for step in range(steps):
        batch = rows[step * 4 : step * 4 + 4]
        rtol = backward_rtol(config, tokens=sum(len(row["input_ids"]) for row in batch))
        out_fast = fast.forward_backward(inputs=batch)
        out_plain = plain.forward_backward(inputs=batch)
        assert out_fast["num_tokens"] == out_plain["num_tokens"]
        assert out_fast["loss"] == pytest.approx(out_plain["loss"], rel=rtol)
        g_fast, g_plain = _grads(fast), _grads(plain)
        assert g_fast.keys() == g_plain.keys() and g_fast
        for key in g_fast:
            # norm-wise within the chain's bound, and elementwise relative to the largest entry
            got, want = g_fast[key], g_plain[key]
            scale = float(want.abs().max())
            assert float((got - want).norm()) <= rtol * float(want.norm()) + 1e-30, (step, key)
            torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale + 1e-30)
        before = [p.detach().clone() for p in plain.state_of().params]
        fast.clip_grad_and_step(max_grad_norm=max_grad_norm)
        plain.clip_grad_and_step(max_grad_norm=max_grad_norm)
        # both clip by their own norm, which differ by at most rtol relative
        clip = min(1.0, max_grad_norm / (plain.state_of().last_grad_norm + 1e-6))
        opt_fast, opt_plain = fast.state_of().optimizer, plain.state_of().optimizer
        params = zip(fast.state_of().params, plain.state_of().params, before)
        for i, (p_fast, p_plain, p_before) in enumerate(params):
            grad = g_plain.get(i)
            if grad is None:
                torch.testing.assert_close(p_fast, p_plain, rtol=0, atol=0)
                continue
            grad_error = clip * rtol * (2 * grad.abs() + grad.abs().max())
            bounds = optimizer_step_bounds(opt_plain, p_plain, clip * grad, grad_error)
            for name, bound in bounds.items():
                if name == "update":
                    got, want = p_fast.detach() - p_before, p_plain.detach() - p_before
                    bound = bound + 4 * FP32_UNIT_ROUNDOFF * p_before.abs()  # the update's roundings
                else:
                    got, want = opt_fast.state[p_fast][name], opt_plain.state[p_plain][name]
                assert bool(((got - want).abs() <= bound + 1e-30).all()), (step, i, name)
        _copy_training_state(plain, fast)
    m_fast, m_plain = fast.calculate_metric(), plain.calculate_metric()
    assert m_fast["token_acc"] == pytest.approx(m_plain["token_acc"])


def _copy_training_state(source, target):
    """Copy ``source``'s trained parameters and optimizer state into ``target`` in place."""
    src, dst = source.state_of(), target.state_of()
    with torch.no_grad():
        for p_dst, p_src in zip(dst.params, src.params):
            p_dst.copy_(p_src)
            for key, value in src.optimizer.state[p_src].items():
                if torch.is_tensor(value):
                    dst.optimizer.state[p_dst][key].copy_(value)
                else:
                    dst.optimizer.state[p_dst][key] = value


def test_lora_fast_path_matches_plain_fp32(tiny_config, monkeypatch):
    from twinkle.patch import lora_fast, lora_mlp

    merged_calls = []
    real_merge_pays = lora_fast.merge_pays

    def counting_merge_pays(x, bases, keep, tokens=None):
        pays = real_merge_pays(x, bases, keep, tokens=tokens)
        merged_calls.append((len(bases), pays))
        return pays

    monkeypatch.setattr(lora_fast, "merge_pays", counting_merge_pays)  # the LoRA Linear's choice
    monkeypatch.setattr(lora_mlp, "merge_pays", counting_merge_pays)  # and the fused MLP's (gate/up)
    fast = _model(tiny_config)
    plain = _model(tiny_config, patches=[])
    assert fast.fast_path_patches == [
        "VarlenAttention",
        "FusedLoraLinear",
        "MergedLoraForward",
        "FusedLoraMLP",
        "FusedLinearCrossEntropy",
    ]
    assert plain.fast_path_patches == []
    for model in (fast, plain):
        model.set_optimizer("AdamW", lr=1e-2)
    _assert_same_training(fast, plain, make_rows(8))
    # the lean LoRA forward really ran (it is exact, so only its presence shows), merged for
    # the layers whose batch has enough tokens
    layer = next(m for m in fast.model.modules() if hasattr(m, "_twinkle_peft_forward"))
    assert "_lean_forward" in layer.forward.__func__.__name__
    assert any(pays for _, pays in merged_calls), "no LoRA layer took the merged path"
    assert any(getattr(m, "_twinkle_fused_lora_mlp", False) for m in fast.model.modules())
    grouped = _model(tiny_config, patches=[*fast.fast_path_patches, "GroupedLoraProjections"])
    assert "GroupedLoraProjections" in grouped.fast_path_patches
    plain = _model(tiny_config, patches=[])
    for model in (grouped, plain):
        model.set_optimizer("AdamW", lr=1e-2)
    merged_calls.clear()
    _assert_same_training(grouped, plain, make_rows(8))
    assert {(3, True), (2, True)} <= set(merged_calls), "q/k/v and gate/up did not run grouped"


def test_unmerged_lora_fast_path_matches_plain_fp32(tiny_config):
    fast = _model(tiny_config, disabled_patches=["MergedLoraForward"])
    plain = _model(tiny_config, patches=[])
    assert "MergedLoraForward" not in fast.fast_path_patches
    for model in (fast, plain):
        model.set_optimizer("AdamW", lr=1e-2)
    _assert_same_training(fast, plain, make_rows(8))


def test_full_parameter_fast_path_matches_plain_fp32_untied():
    config = tiny_qwen2_config(tie_word_embeddings=False)
    fast = _model(config, lora=False)
    plain = _model(config, patches=[], lora=False)
    for model in (fast, plain):
        model.set_optimizer("AdamW", lr=1e-3)
    _assert_same_training(fast, plain, make_rows(8, seed=1))


def test_full_parameter_tied_embeddings_and_padding_free(tiny_config):
    fast = _model(tiny_config, lora=False)
    plain = _model(tiny_config, patches=[], lora=False)
    for model in (fast, plain):
        model.set_processor("PaddingFreeProcessor")
        model.set_optimizer("SGD", lr=0.5)
    _assert_same_training(fast, plain, make_rows(8, seed=2))


def test_outputs_are_logits_free_until_asked(tiny_config):
    fast = _model(tiny_config)
    plain = _model(tiny_config, patches=[])
    rows = make_rows(3, seed=4)
    out = fast.forward(rows)
    assert isinstance(out, HiddenStatesOutput) and not out.logits_materialized
    logits = out["logits"]  # computed on demand, same numbers as the plain model
    assert out.logits_materialized
    torch.testing.assert_close(logits, plain.forward(rows)["logits"], rtol=1e-5, atol=1e-5)
    fast_only = fast.forward_only(rows)
    plain_only = plain.forward_only(rows)
    assert fast_only["loss"] == pytest.approx(plain_only["loss"], rel=1e-5)
    for a, b in zip(fast_only["logps"], plain_only["logps"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_token_logps_losses_get_gradients_through_the_chunked_head(tiny_config):
    """An RL-style loss built on token_logps trains the same on both paths."""
    from twinkle.loss.base import Loss, LossOutput, token_logps

    class NegLogpSquared(Loss):
        def __call__(self, inputs, outputs):
            mask = inputs["shift_labels"] != -100
            logps = token_logps(inputs, outputs)
            return LossOutput(loss=((logps**2) * mask).sum(), num_tokens=int(mask.sum()))

    fast = _model(tiny_config)
    plain = _model(tiny_config, patches=[])
    for model in (fast, plain):
        model.set_loss(NegLogpSquared())
        model.set_optimizer("AdamW", lr=1e-2)
    _assert_same_training(fast, plain, make_rows(8, seed=5))


def test_bf16_adapters_on_a_bf16_model(tiny_config):
    fast = _model(tiny_config, dtype="bfloat16")
    plain = _model(tiny_config, patches=[], dtype="bfloat16")
    assert "Bf16Adapters" in fast.fast_path_patches
    assert {p.dtype for p in fast.state_of().params} == {torch.bfloat16}
    assert {p.dtype for p in plain.state_of().params} == {torch.float32}  # peft's default
    rows = make_rows(4, seed=6)
    out_fast = fast.forward_backward(inputs=rows)
    out_plain = plain.forward_backward(inputs=rows)
    assert out_fast["loss"] == pytest.approx(out_plain["loss"], rel=2e-2)


def test_patches_switch_off_by_name_and_env(tiny_config, monkeypatch):
    model = _model(tiny_config, disabled_patches=["FusedLinearCrossEntropy"])
    assert "FusedLinearCrossEntropy" not in model.fast_path_patches
    assert not get_flag(model.model, "fused_linear_ce", False)
    assert not isinstance(model.forward(make_rows(2)), HiddenStatesOutput)
    monkeypatch.setenv("TWINKLE_DISABLED_PATCHES", "FusedLoraLinear, FusedLinearCrossEntropy,VarlenAttention")
    assert _model(tiny_config).fast_path_patches == []


def test_patches_that_are_off_by_default_switch_on_by_name_and_env(tiny_config, monkeypatch):
    from twinkle.patch.fastpath import resolve_patches

    default = [p.name for p in resolve_patches(None)]
    assert "Fp8FrozenGemms" not in default and "GroupedLoraProjections" not in default
    from twinkle.patch.fp8 import Fp8FrozenGemms

    monkeypatch.setattr(Fp8FrozenGemms, "min_features", 16)  # the tiny model's layers qualify
    model = _model(tiny_config, dtype="bfloat16", enabled_patches=["Fp8FrozenGemms"])
    assert "Fp8FrozenGemms" in model.fast_path_patches
    assert set(model.fast_path_patches) - {"Fp8FrozenGemms"} <= set(default)
    # added to an explicit list too, once, and never past disabled_patches
    names = [p.name for p in resolve_patches(["Bf16Adapters"], enabled=["Fp8FrozenGemms", "Bf16Adapters"])]
    assert names == ["Bf16Adapters", "Fp8FrozenGemms"]
    assert "Fp8FrozenGemms" not in [p.name for p in resolve_patches(None, ["Fp8FrozenGemms"], ["Fp8FrozenGemms"])]
    assert [p.name for p in resolve_patches(None, None, None)] == default  # None: nothing left out or added
    monkeypatch.setenv("TWINKLE_ENABLED_PATCHES", "GroupedLoraProjections, Fp8FrozenGemms")
    names = [p.name for p in resolve_patches(None)]
    assert {"GroupedLoraProjections", "Fp8FrozenGemms"} <= set(names) and set(default) <= set(names)


def test_unknown_patch_names_list_the_registered_ones(tiny_config, monkeypatch):
    from twinkle.registry import ComponentNotFoundError

    with pytest.raises(ComponentNotFoundError, match="FusedLinearCrossEntropy"):
        _model(tiny_config, disabled_patches=["FusedLinearCrossEntropyy"])
    with pytest.raises(ComponentNotFoundError):
        _model(tiny_config, patches=["NoSuchPatch"])
    with pytest.raises(ComponentNotFoundError, match="Fp8FrozenGemms"):
        _model(tiny_config, enabled_patches=["Fp8FrozenGemm"])
    monkeypatch.setenv("TWINKLE_ENABLED_PATCHES", "NoSuchPatch")
    with pytest.raises(ComponentNotFoundError):
        _model(tiny_config)


def test_gpu_only_patches_do_not_apply_on_cpu(tiny_config):
    gpu_only = ["CompileDecoderLayers", "FusedOptimizer", "ActivationCheckpointing", "RecomputeSwiGLU"]
    model = _model(tiny_config, patches=gpu_only)
    assert model.fast_path_patches == []
    model.set_optimizer("AdamW", lr=1e-3)
    assert model.state_of().optimizer.defaults.get("fused") in (None, False)


def test_whole_unpadded_rows_build_no_mask(tiny_config, monkeypatch):
    # a dict batch without attention_mask or position_ids: transformers gets its "masks prepared"
    # mapping of None (sdpa's is_causal; no host read of position_ids), and the loss is the same as
    # with the positions given, where transformers builds the causal mask itself
    import transformers.masking_utils as masking
    from twinkle.patch.fastpath import causal_masks

    model = _model(tiny_config, lora=False)
    hf = model._hf_model()
    assert causal_masks(hf, 64) == dict.fromkeys(hf.config.layer_types)
    found = []
    real = masking.find_packed_sequence_indices
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda pos: found.append(pos) or real(pos))
    ids = torch.randint(0, tiny_config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(3))
    state = model._state(None)
    plain = model._prepare(state, {"input_ids": ids, "labels": ids}, {})
    positioned = dict(plain, position_ids=torch.arange(64).expand(2, 64))
    with torch.no_grad():
        loss = state.loss(plain, model._run(plain)).loss
        assert not found  # no mask built
        want = state.loss(positioned, model._run(positioned)).loss
        assert found  # built from the positions
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    # where None would not be causal attention over every token, transformers builds the mask
    hf.config._attn_implementation = "eager"
    assert causal_masks(hf, 64) is None
    hf.config._attn_implementation = "sdpa"
    monkeypatch.setattr(hf.config, "layer_types", ["sliding_attention"] * len(hf.config.layer_types))
    monkeypatch.setattr(hf.config, "sliding_window", 32)
    assert causal_masks(hf, 64) is None and causal_masks(hf, 32) is not None
