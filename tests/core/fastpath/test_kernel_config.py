"""Kernel tuning is one config object read when a kernel runs: a knob set after import takes effect."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

from twinkle.patch import fused_linear_ce, triton_ce, triton_lora  # noqa: E402
from twinkle.patch.kernel_config import (  # noqa: E402
    KernelConfig,
    kernel_choice,
    kernel_config,
    kernel_settings,
    reset_kernel_config,
    set_kernel_config,
)

#: The variables that were read at import into module constants before the config existed.
LEGACY_VARIABLES = {
    "TWINKLE_CE_BLOCK",
    "TWINKLE_CE_WARPS",
    "TWINKLE_LORA_GRAD_BLOCK_T",
    "TWINKLE_LORA_GRAD_BLOCK_O",
    "TWINKLE_LORA_GRAD_WARPS",
    "TWINKLE_LORA_MERGE_BLOCK_O",
    "TWINKLE_LORA_MERGE_BLOCK_I",
    "TWINKLE_LORA_MERGE_WARPS",
    "TWINKLE_SWIGLU_BLOCK_T",
    "TWINKLE_SWIGLU_BLOCK_C",
    "TWINKLE_SWIGLU_WARPS",
    "TWINKLE_SWIGLU_BWD_BLOCK",
    "TWINKLE_SWIGLU_BWD_WARPS",
    "TWINKLE_LCE_CHUNK_BYTES",
    "TWINKLE_LCE_WEIGHT_GRAD_CHUNK_BYTES",
    "TWINKLE_FP8_MIN_FEATURES",
}


def test_every_former_import_time_variable_is_a_config_field():
    names = {KernelConfig.env_name(f.name) for f in dataclasses.fields(KernelConfig)}
    assert LEGACY_VARIABLES <= names
    # and the call-time choices that were read from the environment where they were used
    assert {"TWINKLE_LCE_KERNEL", "TWINKLE_LCE_COMPILE", "TWINKLE_LORA_GRAD_KERNEL"} <= names
    assert {"TWINKLE_LORA_MERGE_KERNEL", "TWINKLE_SWIGLU_BACKWARD_KERNEL", "TWINKLE_COMPILE_MODE"} <= names


def test_the_environment_sets_the_defaults():
    config = KernelConfig.from_env(
        {"TWINKLE_CE_BLOCK": "1024", "TWINKLE_LCE_COMPILE": "0", "TWINKLE_LCE_KERNEL": "eager", "TWINKLE_CE_WARPS": ""}
    )
    assert (config.ce_block, config.lce_compile, config.lce_kernel) == (1024, False, "eager")
    assert config.ce_warps == 8  # empty: the default
    assert KernelConfig.from_env({}) == KernelConfig()
    with pytest.raises(ValueError, match="TWINKLE_CE_BLOCK='big': ce_block takes an integer"):
        KernelConfig.from_env({"TWINKLE_CE_BLOCK": "big"})
    with pytest.raises(ValueError, match="TWINKLE_LCE_COMPILE='maybe'"):
        KernelConfig.from_env({"TWINKLE_LCE_COMPILE": "maybe"})


def test_the_environment_is_read_again_on_reset(monkeypatch):
    previous = kernel_config()
    try:
        monkeypatch.setenv("TWINKLE_LCE_CHUNK_BYTES", str(1 << 20))  # after import
        assert reset_kernel_config().lce_chunk_bytes == 1 << 20
        assert fused_linear_ce._chunk_rows(100_000, 1024, None) == 256  # 1 MiB of float32 rows of 1024
    finally:
        set_kernel_config(previous)


def test_a_chunk_size_set_after_import_takes_effect():
    vocab = 151936
    assert fused_linear_ce._chunk_rows(100_000, vocab, None) == 512
    with kernel_settings(lce_chunk_bytes=128 << 20, lce_weight_grad_chunk_bytes=256 << 20):
        assert fused_linear_ce._chunk_rows(100_000, vocab, None) == 128
        assert fused_linear_ce._chunk_rows(100_000, vocab, None, weight_grad=True) == 256
    assert fused_linear_ce._chunk_rows(100_000, vocab, None) == 512  # restored after the block
    previous = set_kernel_config(lce_chunk_bytes=64 << 20)
    try:
        assert fused_linear_ce._chunk_rows(100_000, vocab, None) == 64
        kernel_config().lce_chunk_bytes = 32 << 20  # a plain attribute works too
        assert fused_linear_ce._chunk_rows(100_000, vocab, None) == 32
    finally:
        set_kernel_config(previous)


class _Recorder:
    """A stand-in for a Triton kernel: ``kernel[grid](*args, **meta)`` records ``grid`` and ``meta``."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((grid, meta))


def test_the_ce_kernel_reads_its_tiles_per_call(monkeypatch):
    recorder = _Recorder()
    monkeypatch.setattr(triton_ce, "_kernel", lambda: recorder)
    logits, labels = torch.zeros(3, 10), torch.zeros(3, dtype=torch.long)
    out = (torch.empty(3), torch.empty(3, dtype=torch.long))
    triton_ce.ce_chunk_(logits, labels, 0.0, *out)
    with kernel_settings(ce_block=128, ce_warps=2):
        triton_ce.ce_chunk_(logits, labels, 0.0, *out)
    assert [(meta["BLOCK"], meta["num_warps"]) for _, meta in recorder.calls] == [(4096, 8), (128, 2)]


@pytest.mark.skipif(not triton_lora.available(), reason="needs triton")
def test_the_merge_kernel_reads_its_tiles_per_call(monkeypatch):
    """The op is registered once; each call launches with the tiles in effect then (and stays exact)."""
    triton_lora.register()
    launches = []
    real_launch = triton_lora._launch

    def recording_launch(kernel):
        launched = real_launch(kernel)

        class Grid:
            def __getitem__(self, grid):
                def run(*args, **meta):
                    launches.append((grid, meta["BO"], meta["BI"], meta["num_warps"]))
                    return launched[grid](*args, **meta)

                return run

        return Grid()

    monkeypatch.setattr(triton_lora, "_launch", recording_launch)
    gen = torch.Generator().manual_seed(0)
    weight, weight_b, weight_a = (
        torch.randn(40, 24, generator=gen),
        torch.randn(40, 4, generator=gen),
        torch.randn(4, 24, generator=gen),
    )
    want = torch.addmm(weight, weight_b, weight_a, alpha=0.5)
    default = torch.ops.twinkle.lora_merge([weight], [weight_b], [weight_a], [0.5])
    with kernel_settings(lora_merge_block_o=16, lora_merge_block_i=16, lora_merge_warps=2):
        small = torch.ops.twinkle.lora_merge([weight], [weight_b], [weight_a], [0.5])
    assert launches == [((2, 1), 32, 256, 4), ((3, 2), 16, 16, 2)]
    torch.testing.assert_close(default, want, rtol=1e-5, atol=1e-5)  # float32 products either way
    torch.testing.assert_close(small, want, rtol=1e-5, atol=1e-5)


def test_kernel_choice_reads_the_config_when_not_given():
    with kernel_settings(lora_grad_kernel="off"):
        assert kernel_choice("grad_kernel", None, "lora_grad_kernel", "MergedLoraForward") is False
        assert kernel_choice("grad_kernel", "auto", "lora_grad_kernel", "MergedLoraForward") == "auto"
    with pytest.raises(ValueError, match=r"MergedLoraForward: grad_kernel must be .*TWINKLE_LORA_GRAD_KERNEL"):
        kernel_choice("grad_kernel", "sometimes", "lora_grad_kernel", "MergedLoraForward")
    with pytest.raises(TypeError):
        set_kernel_config(no_such_knob=1)
