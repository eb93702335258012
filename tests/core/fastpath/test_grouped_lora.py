"""GroupedLoraProjections: q/k/v and gate/up computed together equal the per-projection LoRA (CPU, float64)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from fastpath_test_utils import forward_backward, tiny_qwen2_config  # noqa: E402
from twinkle.patch import lora_fast  # noqa: E402
from twinkle.patch.lora_fast import (  # noqa: E402
    FusedLoraLinear,
    GroupedLoraProjections,
    MergedLoraForward,
    lora_linear_layers,
)


def _lora_qwen2(dropout: float = 0.0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_qwen2_config(), dtype=torch.float64, attn_implementation="sdpa")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False
    )
    model = peft.get_peft_model(model, config)
    # peft builds the adapters in float32 by default; the merged path needs one dtype
    for p in model.parameters():
        p.data = p.data.double()
    FusedLoraLinear().apply(model)
    MergedLoraForward().apply(model)
    return model


def _ids(tokens: int = 160):
    return torch.randint(0, 512, (2, tokens // 2), generator=torch.Generator().manual_seed(1))


def _group_sizes(monkeypatch) -> list[int]:
    sizes = []
    real = lora_fast._merged_lora

    def counting(x, members, *args):
        sizes.append(len(members))
        return real(x, members, *args)

    monkeypatch.setattr(lora_fast, "_merged_lora", counting)
    return sizes


@pytest.mark.parametrize("stack", [False, True])
def test_grouped_equals_per_projection(monkeypatch, stack):
    model = _lora_qwen2()
    ids = _ids()
    want = forward_backward(model, ids)
    patch = GroupedLoraProjections(stack=stack)
    assert patch.applies_to(model)
    groups = patch.groups(model)
    assert [len(g) for g in groups] == [3, 2] * model.config.num_hidden_layers
    patch.apply(model)
    sizes = _group_sizes(monkeypatch)
    got = forward_backward(model, ids)
    # per layer: q/k/v together, o alone, gate/up together, down alone
    assert sizes == [3, 1, 2, 1] * model.config.num_hidden_layers
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert got[2].keys() == want[2].keys() and all("lora_" in n for n in got[2])
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], msg=name)
    # nothing is left behind for a follower after the forward
    assert all(getattr(layer, "_twinkle_group_out", None) is None for layer in lora_linear_layers(model))
    patch.revert(model)
    assert not any(hasattr(layer, "_twinkle_group") for layer in lora_linear_layers(model))


@pytest.mark.parametrize("stack", [False, True])
def test_grouped_forward_without_gradients(monkeypatch, stack):
    model = _lora_qwen2()
    ids = torch.randint(0, 512, (1, 100))  # no backward: merging pays from hidden_size (64) tokens
    with torch.no_grad():
        want = model(ids).logits
        GroupedLoraProjections(stack=stack).apply(model)
        sizes = _group_sizes(monkeypatch)
        got = model(ids).logits
    assert 3 in sizes and 2 in sizes
    torch.testing.assert_close(got, want)


def test_small_batches_and_other_inputs_run_per_projection(monkeypatch):
    model = _lora_qwen2()
    GroupedLoraProjections().apply(model)
    sizes = _group_sizes(monkeypatch)
    ids = torch.randint(0, 512, (1, 8))  # 8 tokens: merging does not pay, so neither does grouping
    forward_backward(model, ids)
    assert sizes == []
    # a follower called with another tensor than its leader's input computes its own output
    attn = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(1, 100, 64, dtype=torch.float64)
    q, k = attn.q_proj(x), attn.k_proj(x.clone())
    torch.testing.assert_close(k, attn.k_proj(x))
    assert q.shape[-1] == attn.q_proj.out_features


def test_adapters_with_dropout_are_not_grouped(monkeypatch):
    model = _lora_qwen2(dropout=0.1)  # dropout: peft's own forward for every projection
    GroupedLoraProjections().apply(model)
    sizes = _group_sizes(monkeypatch)
    forward_backward(model, _ids())
    assert sizes == []


@pytest.mark.parametrize("stack", [False, True])
def test_grouped_layer_traces_whole_under_compile(stack):
    model = _lora_qwen2()
    ids = _ids()
    want = forward_backward(model, ids)
    GroupedLoraProjections(stack=stack).apply(model)
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    layers = model.base_model.model.model.layers
    for layer in layers:
        layer.compile(backend=counter, fullgraph=True)  # a graph break would raise
    got = forward_backward(model, ids)
    torch._dynamo.reset()
    assert counter.frame_count == 1  # one graph, reused by every layer
    torch.testing.assert_close(got[0], want[0])
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], msg=name)
