"""The model shapes and FLOP accounting the GPU benchmarks share.

Qwen2.5-0.5B and -7B as published (random weights are built from these), the fields every
Qwen2 config of the benchmarks carries, and the MFU arithmetic of the issue tables: a token
costs ``c * N + 12 * layers * hidden * seq`` FLOPs, ``N`` the parameters that take part in a
matmul (all linear layers and the LM head), ``c`` 6 for full training and 4 for LoRA (no
weight gradients of the frozen base), against the H200's dense bf16 datasheet figure.

The benchmarks run as scripts (``python benchmarks/x.py``), so this folder is on
``sys.path`` and ``from model_shapes import ...`` finds this module.
"""

from __future__ import annotations

#: H200 dense bf16 datasheet TFLOP/s (MFU is reported against it).
PEAK_TFLOPS = 989.0

QWEN25_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
)
QWEN25_7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    tie_word_embeddings=False,
)
#: A shape for checking a benchmark's harness on any device.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    tie_word_embeddings=True,
)
#: Fields of every Qwen2 configuration the benchmarks build (besides the shape).
QWEN2_COMMON = dict(
    model_type="qwen2",
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    hidden_act="silu",
    use_sliding_window=False,
)


def qwen2_config(shape: dict) -> dict:
    """A config dict (``model_type`` plus fields) of a Qwen2 model of ``shape``."""
    return {**QWEN2_COMMON, **shape}


def matmul_params(shape: dict) -> int:
    """N: parameters that take part in a matmul per token (all linear layers + the LM head)."""
    h, i, n_layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    head_dim = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    attn = h * h + 2 * h * kv + h * h + h + 2 * kv  # q, k, v (with bias), o
    mlp = 3 * h * i
    return n_layers * (attn + mlp) + shape["vocab_size"] * h


def flops_per_token(shape: dict, lora: bool, seq_len: int, n_params: int | None = None) -> float:
    """``c * N + 12 * layers * hidden * seq_len``; ``N`` is :func:`matmul_params` unless given."""
    attention = 12 * shape["num_hidden_layers"] * shape["hidden_size"] * seq_len
    return (4 if lora else 6) * (matmul_params(shape) if n_params is None else n_params) + attention
