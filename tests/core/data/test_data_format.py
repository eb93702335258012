"""Data formats: plain-dict TypedDicts, validated with pydantic at boundaries only."""

from __future__ import annotations

import pickle
import sys

import pytest
from twinkle.data_format import InputFeature, Message, Trajectory, validate_trajectory
from twinkle.data_format.messages import TrajectoryError


def test_typed_dicts_are_plain_dicts():
    message: Message = {"role": "user", "content": "hi"}
    trajectory: Trajectory = {"messages": [message], "user_data": {"answer": "1"}}
    feature: InputFeature = {"input_ids": [1, 2], "labels": [-100, 2], "length": 2}
    assert type(trajectory) is dict and type(feature) is dict
    assert validate_trajectory(trajectory) is trajectory


def test_validation_names_row_and_field():
    good_tool_call = {
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": "ok", "tool_call_id": "1"},
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    validate_trajectory(good_tool_call)
    with pytest.raises(TrajectoryError, match=r"row 7: .*field messages\.0\.role: Input should be 'system'"):
        validate_trajectory({"messages": [{"role": "bot", "content": "x"}]}, index=7)
    with pytest.raises(TrajectoryError, match=r"field messages\.0: .*a user message needs 'content'"):
        validate_trajectory({"messages": [{"role": "user"}]})
    with pytest.raises(TrajectoryError, match="at least one message"):
        validate_trajectory({"messages": []})
    with pytest.raises(TrajectoryError, match="must be a dict"):
        validate_trajectory([{"role": "user", "content": "x"}])


def test_errors_survive_worker_processes():
    from twinkle.preprocessor.base import BadRowError
    from twinkle.template.base import SequenceTooLongError, TemplateError

    for exc in (
        BadRowError("answer", "is empty", 3, "fill it", "GSM8KProcessor"),
        TemplateError("bad", 2),
        SequenceTooLongError("long", 10, 5, 1),
    ):
        again = pickle.loads(pickle.dumps(exc))
        assert type(again) is type(exc) and str(again) == str(exc)


def test_importing_twinkle_data_modules_stays_light():
    import subprocess

    code = (
        "import sys, twinkle.data_format.messages, twinkle.data_format.features, twinkle.dataset, "
        "twinkle.dataloader, twinkle.template, twinkle.preprocessor, twinkle.hub, twinkle.assets; "
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'pydantic', 'modelscope') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
