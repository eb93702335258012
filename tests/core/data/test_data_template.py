"""Template: labels on exactly the assistant tokens, both label paths, truncation, errors."""

from __future__ import annotations

import json

import pytest
from data_test_utils import trained_text
from twinkle.template.base import SequenceTooLongError, Template, TemplateError

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你是谁？"},
        {"role": "assistant", "content": "我是twinkle大模型"},
        {"role": "user", "content": "And 2+3?"},
        {"role": "assistant", "content": "5", "reasoning_content": "2 plus 3"},
    ]
}
TOOLS_CHAT = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "content": "sunny, 21C"},
        {"role": "assistant", "content": "Sunny and 21C."},
    ],
    "tools": '[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]',
}


@pytest.fixture(scope="module")
def round_by_round(tiny_dir):
    """The same tokenizer with the {% generation %} markers removed: labels come round by round."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = tok.chat_template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    template = Template(tiny_dir, tokenizer=tok)
    assert not template.uses_generation_tags
    return template


def test_labels_cover_exactly_the_assistant_turns(template):
    assert template.uses_generation_tags
    feature = template.encode(CHAT)
    assert len(feature["input_ids"]) == len(feature["labels"]) == feature["length"]
    assert trained_text(template, feature) == "我是twinkle大模型<|im_end|><think>\n2 plus 3\n</think>\n\n5<|im_end|>"
    text = template.decode(feature["input_ids"], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_tool_calls_and_tool_responses(template):
    feature = template.encode(TOOLS_CHAT)
    trained = trained_text(template, feature)
    assert trained == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
        "Sunny and 21C.<|im_end|>"
    )
    text = template.decode(feature["input_ids"], skip_special_tokens=False)
    assert "# Tools" in text and "<tool_response>\nsunny, 21C\n</tool_response>" in text


@pytest.mark.parametrize("trajectory", [CHAT, TOOLS_CHAT], ids=["chat", "tools"])
def test_round_by_round_labels_equal_generation_mask_labels(template, round_by_round, trajectory):
    assert round_by_round.encode(trajectory) == template.encode(trajectory)


def test_batch_encode_equals_encode_one_by_one(template, round_by_round):
    trajectories = [CHAT, TOOLS_CHAT, {"messages": CHAT["messages"][1:3]}]
    assert template.batch_encode(trajectories) == [template.encode(t) for t in trajectories]
    assert round_by_round.batch_encode(trajectories) == template.batch_encode(trajectories)


def test_arrow_none_fields_are_ignored(template):
    with_nones = {"messages": [dict(m, tool_calls=None, name=None) for m in CHAT["messages"]], "user_data": None}
    assert template.encode(with_nones) == template.encode(CHAT)


def test_generation_prompt_and_default_system(tiny_dir, template):
    prompt = {"messages": [{"role": "user", "content": "hi"}]}
    feature = template.encode(prompt, add_generation_prompt=True)
    assert set(feature["labels"]) == {-100}
    assert template.decode(feature["input_ids"], skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    custom = Template(tiny_dir, default_system="You are twinkle.")
    text = custom.decode(custom.encode(prompt)["input_ids"], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are twinkle.<|im_end|>")
    assert custom.decode(custom.encode(CHAT)["input_ids"], False).startswith("<|im_start|>system\nBe brief.")


def test_truncation_strategies(tiny_dir, template):
    full = template.encode(CHAT)
    n = full["length"]
    with pytest.raises(SequenceTooLongError, match=f"{n} tokens is longer than max_length=10") as info:
        Template(tiny_dir, max_length=10).encode(CHAT)
    assert info.value.length == n and "truncation_strategy" in str(info.value)
    left = Template(tiny_dir, max_length=10, truncation_strategy="left").encode(CHAT)
    assert left["input_ids"] == full["input_ids"][-10:] and left["labels"] == full["labels"][-10:]
    right = Template(tiny_dir, max_length=10, truncation_strategy="right").encode(CHAT)
    assert right["input_ids"] == full["input_ids"][:10] and right["length"] == 10
    delete = Template(tiny_dir, max_length=10, truncation_strategy="delete")
    assert delete.encode_rows([CHAT, {"messages": [{"role": "user", "content": "a"}]}], True)[0] is None
    with pytest.raises(TemplateError, match="truncation_strategy"):
        Template(tiny_dir, truncation_strategy="middle")


def test_rejected_side_is_encoded_for_preference_pairs(template):
    pair = {
        "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        "rejected_messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
    }
    feature = template.encode(pair)
    assert trained_text(template, feature) == "4<|im_end|>"
    rejected = {"input_ids": feature["rejected_input_ids"], "labels": feature["rejected_labels"]}
    assert trained_text(template, rejected) == "5<|im_end|>"
    assert feature["rejected_length"] == len(feature["rejected_input_ids"])


def test_tokenizer_without_chat_template_gets_the_fix(tmp_path, tiny_dir):
    import json
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "plain")
    config_path = tmp_path / "plain" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    template = Template(str(tmp_path / "plain"))
    with pytest.raises(TemplateError, match="no chat template.*chat_template"):
        template.encode(CHAT)


def test_bad_trajectories_name_the_position_and_field(template):
    with pytest.raises(TemplateError, match="trajectory 1: field 'messages' is missing"):
        template.batch_encode([CHAT, {"query": "x"}])
    with pytest.raises(TemplateError, match=r"trajectory 0: messages\[0\] must be a dict"):
        template.encode({"messages": ["hello"]})
    with pytest.raises(TemplateError, match="trajectory 1: the chat template .* failed to render"):
        template.batch_encode([CHAT, {"messages": [{"role": "user"}]}])


def test_decode_skips_ignore_index(template):
    feature = template.encode(CHAT)
    assert template.decode(feature["labels"]) == "我是twinkle大模型<think>\n2 plus 3\n</think>\n\n5"


def test_fast_path_equals_the_public_apply_chat_template(template):
    """Template renders with transformers' renderer and the Rust tokenizer; labels match the public call."""
    tok = template.tokenizer
    trajectories = [CHAT, TOOLS_CHAT, {"messages": CHAT["messages"][1:3]}]
    for trajectory, feature in zip(trajectories, template.batch_encode(trajectories)):
        messages = [{k: v for k, v in m.items() if v is not None} for m in trajectory["messages"]]
        tools = trajectory.get("tools")
        public = tok.apply_chat_template(
            messages,
            tools=json.loads(tools) if tools else None,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        assert feature["input_ids"] == list(public["input_ids"])
        assert feature["labels"] == [t if m else -100 for t, m in zip(public["input_ids"], public["assistant_masks"])]
