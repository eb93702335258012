"""examples/grpo_vllm.py: GRPO with VLLMSampler learns (the mean reward rises), on the session's engine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo_vllm.py"


def test_grpo_with_vllm_sampler_learns(fresh_sampler, figures):
    spec = importlib.util.spec_from_file_location("grpo_vllm_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    summary = example.main(steps=40, seed=0, verbose=False, sampler=fresh_sampler)
    figures["grpo_reward_first"] = summary["first"]
    figures["grpo_reward_last"] = summary["last"]
    figures["grpo_lora_sync_ms"] = summary["sync_seconds_mean"] * 1000
    assert len(summary["rewards"]) == 40
    assert summary["last"] > summary["first"] + 0.05, summary["rewards"]
