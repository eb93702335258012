"""Fixtures of the megatron tests: tiny random-weight models per family, rows, the gpu marker.

Every test here needs megatron-core (the `megatron` nox session installs it); without it
the whole folder is skipped with the install command.
"""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed: pip install twinkle-megatron")

#: tiny configurations, one per supported family (random weights, built from the config).
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=128,
)
FAMILIES = {
    "qwen2": {},
    "qwen3": dict(head_dim=16),
    "llama": dict(tie_word_embeddings=True),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, head_dim=16),
}


def tiny_config(model_type: str) -> dict:
    """A config dict (``model_type`` plus fields) for ``TransformersModel/MegatronModel(config=...)``."""
    return {"model_type": model_type, **TINY, **FAMILIES[model_type]}


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "ignore::DeprecationWarning:megatron",
        "ignore::UserWarning:megatron",
        "ignore:.*Transformer Engine and Apex are not installed.*",
    ):
        config.addinivalue_line("filterwarnings", line)


@pytest.fixture(scope="module")
def megatron_cpu():
    """megatron-core on CPU: the compat shims and a one-process parallel state (undone after the module)."""
    from twinkle_megatron import compat, parallel

    compat.apply("cpu")
    parallel.init_megatron_parallel(None, "cpu")
    yield
    compat.restore()


@pytest.fixture(scope="session")
def rows() -> list[dict]:
    """Four encoded rows of different lengths; the first 3 tokens of each are prompt (-100)."""
    import torch

    g = torch.Generator().manual_seed(1)
    out = []
    for n in (9, 12, 7, 10):
        ids = torch.randint(0, 128, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out
