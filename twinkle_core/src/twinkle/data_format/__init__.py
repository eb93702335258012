"""Public data formats that flow between components.

raw rows -> Preprocessor -> :class:`Trajectory` (messages) -> Template.encode ->
:class:`InputFeature` (input_ids, labels, ...) -> DataLoader batch (``list[InputFeature]``)
-> InputProcessor -> model -> :class:`ModelOutput`. RL adds :class:`SamplingParams` and
:class:`SampleResponse` (sampled sequences).

Loaded lazily; importing this package imports nothing heavy.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    # messages.py (data pipeline)
    "Message": "twinkle.data_format.messages:Message",
    "ToolCall": "twinkle.data_format.messages:ToolCall",
    "Trajectory": "twinkle.data_format.messages:Trajectory",
    "validate_trajectory": "twinkle.data_format.messages:validate_trajectory",
    # features.py (data pipeline)
    "InputFeature": "twinkle.data_format.features:InputFeature",
    "IGNORE_INDEX": "twinkle.data_format.features:IGNORE_INDEX",
    # output.py (model backends)
    "ModelOutput": "twinkle.data_format.output:ModelOutput",
    # sampling.py (samplers / RL)
    "SamplingParams": "twinkle.data_format.sampling:SamplingParams",
    "SampledSequence": "twinkle.data_format.sampling:SampledSequence",
    "SampleResponse": "twinkle.data_format.sampling:SampleResponse",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'twinkle.data_format' has no attribute {name!r}")
    from twinkle._utils import import_target

    return import_target(target)


def __dir__() -> list[str]:
    return sorted(_EXPORTS)
