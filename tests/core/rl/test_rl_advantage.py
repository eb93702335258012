"""Advantage estimators: values against hand computation, contiguous groups, clear shape errors."""

from __future__ import annotations

import math

import pytest
import torch
from twinkle.advantage import GRPOAdvantage, REINFORCEAdvantage, RLOOAdvantage
from twinkle.runtime import get_registry


def test_registered():
    names = ("GRPOAdvantage", "RLOOAdvantage", "REINFORCEAdvantage")
    registered = {name: get_registry().resolve("advantage", name) for name in names}
    assert registered == {
        "GRPOAdvantage": GRPOAdvantage,
        "RLOOAdvantage": RLOOAdvantage,
        "REINFORCEAdvantage": REINFORCEAdvantage,
    }


def test_grpo_group_scaling_matches_torch():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 2.0, 1.0, 3.0])
    groups = rewards.view(2, 4)
    expected = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).flatten()
    assert GRPOAdvantage()(rewards, num_generations=4) == pytest.approx(expected.tolist(), rel=1e-6)


def test_grpo_batch_and_no_scaling():
    rewards = [1.0, 0.0, 0.5, 0.0, 2.0, 2.0, 1.0, 3.0]
    t = torch.tensor(rewards).view(2, 4)
    centered = (t - t.mean(1, keepdim=True)).flatten()
    assert GRPOAdvantage(scale="none")(rewards, 4) == pytest.approx(centered.tolist())
    assert GRPOAdvantage(scale="batch")(rewards, 4) == pytest.approx(
        (centered / (torch.tensor(rewards).std() + 1e-4)).tolist()
    )


def test_groups_are_contiguous():
    # prompt 0's samples all got 1, prompt 1's all got 0: no signal inside either group
    assert GRPOAdvantage()([1, 1, 0, 0], num_generations=2) == [0.0, 0.0, 0.0, 0.0]
    # interleaved would have given signal; contiguous does not mix prompts
    assert GRPOAdvantage()([1, 0, 1, 0], num_generations=2)[0] > 0


def test_rloo_and_reinforce():
    assert RLOOAdvantage()([1.0, 0.0, 0.0, 3.0, 1.0, 2.0], num_generations=3) == pytest.approx(
        [1.0, -0.5, -0.5, 1.5, -1.5, 0.0]
    )
    assert REINFORCEAdvantage()([1.0, 0.0, 1.0, 0.0]) == [0.5, -0.5, 0.5, -0.5]
    assert REINFORCEAdvantage(baseline="none")([1.0, 0.0]) == [1.0, 0.0]
    assert REINFORCEAdvantage(baseline="group")([1.0, 0.0, 3.0, 1.0], num_generations=2) == [0.5, -0.5, 1.0, -1.0]
    ema = REINFORCEAdvantage(baseline="ema", momentum=0.5)
    assert ema([1.0, 1.0]) == [0.0, 0.0]  # first baseline = first batch mean (1.0)
    assert ema([3.0, 3.0]) == [2.0, 2.0]  # baseline still 1.0, then moves to 2.0
    assert ema([3.0, 3.0]) == [1.0, 1.0]
    white = REINFORCEAdvantage(whiten=True)([1.0, 0.0, 1.0, 0.0])
    assert math.isclose(torch.tensor(white).std().item(), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: GRPOAdvantage()([1.0, 0.0, 1.0], num_generations=2), "do not split into groups"),
        (lambda: GRPOAdvantage()([[1.0, 0.0], [1.0, 0.0]], num_generations=2), "must be flat"),
        (lambda: GRPOAdvantage()([1.0, float("nan")], num_generations=2), "finite"),
        (lambda: GRPOAdvantage()([1.0, 0.0], num_generations=0), "positive int"),
        (lambda: GRPOAdvantage(scale="std"), "must be one of"),
        (lambda: RLOOAdvantage()([1.0, 0.0], num_generations=1), "num_generations >= 2"),
        (lambda: GRPOAdvantage()(torch.ones(2, 2), num_generations=2), "must be flat"),
    ],
)
def test_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
