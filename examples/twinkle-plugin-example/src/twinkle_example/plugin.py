"""The plugin's entry point: registers its components by name, importing nothing heavy."""

from __future__ import annotations

import twinkle


@twinkle.hookimpl
def twinkle_register_components(register) -> None:  # noqa: ANN001 - typed by twinkle.hookspecs
    register(
        "loss",
        "LabelSmoothingLoss",
        "twinkle_example.loss:LabelSmoothingLoss",
        doc="cross-entropy with label smoothing",
    )
    register(
        "reward",
        "KeywordReward",
        "twinkle_example.reward:KeywordReward",
        doc="1.0 when the completion contains every keyword",
    )
    register(
        "preprocessor",
        "QAPairProcessor",
        "twinkle_example.preprocessor:QAPairProcessor",
        doc="question/answer rows -> chat trajectories",
    )
