"""The example plugin's own tests, using twinkle-core's ``twinkle_plugin`` fixture."""

from __future__ import annotations

import pytest
from twinkle_example import plugin


def test_components_register_and_resolve(twinkle_plugin):
    runtime = twinkle_plugin(plugin, name="example")
    registry = runtime.registry
    assert registry.get("loss", "LabelSmoothingLoss").plugin == "example"
    from twinkle_example.loss import LabelSmoothingLoss
    from twinkle_example.preprocessor import QAPairProcessor
    from twinkle_example.reward import KeywordReward

    assert registry.resolve("loss", "LabelSmoothingLoss") is LabelSmoothingLoss
    assert registry.resolve("reward", "KeywordReward") is KeywordReward
    assert registry.resolve("preprocessor", "QAPairProcessor") is QAPairProcessor


def test_reward_scores_keywords():
    from twinkle_example.reward import KeywordReward

    trajectories = [
        {"messages": [{"role": "user", "content": "who?"}, {"role": "assistant", "content": "I am Twinkle, by Team"}]},
        {"messages": [{"role": "user", "content": "who?"}, {"role": "assistant", "content": "I am a model"}]},
    ]
    assert KeywordReward(["twinkle", "team"])(trajectories) == [1.0, 0.0]
    with pytest.raises(ValueError, match="needs keywords"):
        KeywordReward()(trajectories)


def test_preprocessor_builds_trajectories_and_names_bad_rows():
    from twinkle.preprocessor.base import BadRowError
    from twinkle_example.preprocessor import QAPairProcessor

    [trajectory] = QAPairProcessor(system="Be brief.")([{"question": "2+2?", "answer": "4"}])
    assert [m["role"] for m in trajectory["messages"]] == ["system", "user", "assistant"]
    assert trajectory["user_data"] == {"answer": "4"}
    with pytest.raises(BadRowError, match="row 1.*'answer'"):
        QAPairProcessor()([{"question": "a", "answer": "b"}, {"question": "c"}])
    dropping = QAPairProcessor(on_bad_row="drop")
    assert len(dropping([{"question": "a", "answer": "b"}, {"question": "c"}])) == 1 and dropping.dropped == 1


def test_label_smoothing_loss_matches_its_formula():
    torch = pytest.importorskip("torch")
    from twinkle_example.loss import LabelSmoothingLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    out = LabelSmoothingLoss(smoothing=0.0)({"shift_labels": labels}, {"logits": logits})
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), reduction="sum")
    assert torch.allclose(out.loss, reference) and int(out.num_tokens) == 8
    smoothed = LabelSmoothingLoss(smoothing=0.2)({"shift_labels": labels}, {"logits": logits})
    ref_smoothed = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 11), labels.reshape(-1), reduction="sum", label_smoothing=0.2
    )
    assert torch.allclose(smoothed.loss, ref_smoothed, atol=1e-5)
    smoothed.loss.backward()
    assert logits.grad is not None and logits.grad[0, :2].abs().sum() == 0
