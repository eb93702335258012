"""Preprocessors and filters: every built-in on the bundled data, bad rows, drops, registry names."""

from __future__ import annotations

import logging

import pytest
from data_test_utils import trained_text
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.preprocessor.base import BadRowError


def _dataset(rows=None, path=None):
    if rows is not None:
        return Dataset(dataset_meta=DatasetMeta("rows", rows=rows))
    return Dataset(dataset_meta=DatasetMeta(path))


def test_every_builtin_is_registered_and_resolves():
    from twinkle.preprocessor import Filter, Preprocessor
    from twinkle.runtime import get_registry

    registry = get_registry()
    expected = {
        "SelfCognitionProcessor",
        "AlpacaProcessor",
        "MessagesProcessor",
        "GSM8KProcessor",
        "CompetitionMathProcessor",
        "DPOProcessor",
    }
    assert expected <= set(registry.names("preprocessor"))
    assert {"LengthFilter", "EmptyMessageFilter"} <= set(registry.names("filter"))
    for name in expected:
        assert issubclass(registry.resolve("preprocessor", name), Preprocessor)
    assert issubclass(registry.resolve("filter", "LengthFilter"), Filter)


def test_self_cognition_pairs_pick_by_language(data_file):
    from twinkle.preprocessor import SelfCognitionProcessor

    dataset = _dataset(path=data_file("self_cognition.jsonl"))
    dataset.map(SelfCognitionProcessor(("小闪", "Twinkle"), ("魔搭", "ModelScope")))
    rows = list(dataset)
    assert len(rows) == 150 and all(r["messages"][0]["content"] == "You are a helpful assistant." for r in rows)
    english = [r for r in rows if r["messages"][1]["content"].isascii()]
    assert english and all("Twinkle" in r["messages"][2]["content"] for r in english)
    chinese = [r for r in rows if not r["messages"][1]["content"].isascii()]
    assert chinese and all("小闪" in r["messages"][2]["content"] for r in chinese)


def test_alpaca_joins_instruction_and_input(data_file, template):
    dataset = _dataset(path=data_file("alpaca_tiny.jsonl"))
    dataset.map("AlpacaProcessor", system="Be terse.")
    row = next(r for r in dataset if "\n" in r["messages"][1]["content"])
    assert row["messages"][0] == {"role": "system", "content": "Be terse."}
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]


def test_sharegpt_and_openai_messages(data_file, template):
    dataset = _dataset(path=data_file("sharegpt_tiny.jsonl"))
    dataset.map("MessagesProcessor")
    rows = list(dataset)
    assert len(rows) == 24
    assert any(r["messages"][0]["role"] == "system" for r in rows)
    multi = next(r for r in rows if len(r["messages"]) == 4)
    feature = template.encode(multi)
    assistant = [m["content"] for m in multi["messages"] if m["role"] == "assistant"]
    assert trained_text(template, feature) == "".join(a + "<|im_end|>" for a in assistant)
    openai = _dataset(
        rows=[{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "system": "S"}]
    )
    openai.map("MessagesProcessor")
    assert [m["role"] for m in openai[0]["messages"]] == ["system", "user", "assistant"]


def test_gsm8k_and_math_put_the_ground_truth_in_user_data(data_file):
    gsm = _dataset(path=data_file("gsm8k_tiny.jsonl"))
    gsm.map("GSM8KProcessor", system="Answer after ####.")
    row = gsm[0]
    assert row["user_data"]["answer"] == row["user_data"]["solution"].rsplit("#### ", 1)[1]
    assert [m["role"] for m in row["messages"]] == ["system", "user"]
    sft = _dataset(path=data_file("gsm8k_tiny.jsonl"))
    sft.map("GSM8KProcessor", with_answer=True)
    assert sft[0]["messages"][-1]["role"] == "assistant" and "<<" not in sft[0]["messages"][-1]["content"]

    math = _dataset(path=data_file("math_tiny.jsonl"))
    math.map("CompetitionMathProcessor")
    answers = [r["user_data"]["answer"] for r in math]
    assert all(a and "boxed" not in a for a in answers)
    assert any(a.startswith("\\frac{") for a in answers)  # nested braces survive


def test_dpo_pairs(data_file, template):
    dataset = _dataset(path=data_file("dpo_tiny.jsonl"))
    dataset.map("DPOProcessor")
    row = dataset[0]
    assert row["messages"][:-1] == row["rejected_messages"][:-1]
    assert row["messages"][-1]["content"] != row["rejected_messages"][-1]["content"]
    dataset.set_template(template)
    dataset.encode()
    assert {"rejected_input_ids", "rejected_labels", "rejected_length"} <= set(dataset.column_names)


@pytest.mark.parametrize(
    ("processor", "rows", "pattern"),
    [
        (
            "AlpacaProcessor",
            [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": ""}],
            "'output': is empty",
        ),
        ("GSM8KProcessor", [{"question": "q", "answer": "1 #### 1"}, {"question": "q", "answer": "x"}], "'answer'"),
        ("CompetitionMathProcessor", [{"problem": "p", "solution": "\\boxed{1}"}, {"problem": "p"}], "'solution'"),
        ("DPOProcessor", [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c"}], "rejected"),
        (
            "MessagesProcessor",
            [
                {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                {"messages": [{"role": "robot", "content": "a"}]},
            ],
            r"messages\[0\].role",
        ),
    ],
)
def test_bad_rows_raise_with_row_index_and_field(processor, rows, pattern):
    padding = rows[:1] * 5  # the bad row is row 6, in the second batch of 3
    dataset = _dataset(rows=padding + rows)
    with pytest.raises(BadRowError, match=f"row 6: field .*{pattern}") as info:
        dataset.map(processor, batch_size=3)
    assert info.value.index == 6 and processor in str(info.value)


def test_bad_rows_can_be_dropped_counted_and_logged(caplog):
    from twinkle.preprocessor import AlpacaProcessor

    rows = [
        {"instruction": "a", "output": "b"},
        {"instruction": "", "output": "b"},
        {"instruction": "c", "output": "d"},
    ]
    processor = AlpacaProcessor(on_bad_row="drop")
    with caplog.at_level(logging.WARNING):
        out = processor(rows)
    assert [r["messages"][-1]["content"] for r in out] == ["b", "d"] and processor.dropped == 1
    assert "row 1: field 'instruction': is empty" in caplog.text
    dataset = _dataset(rows=rows)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="twinkle.dataset"):
        dataset.map(AlpacaProcessor(on_bad_row="drop"))
    assert len(dataset) == 2
    assert "dropped 1 of 3 rows" in caplog.text


def test_filters(template, caplog):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "only a prompt"}]},
        {"messages": [{"role": "user", "content": "long " * 40}, {"role": "assistant", "content": "ok"}]},
    ]
    dataset = _dataset(rows=rows)
    with caplog.at_level(logging.WARNING, logger="twinkle.dataset"):
        dataset.filter("EmptyMessageFilter", require_assistant=True)
    assert len(dataset) == 2 and "EmptyMessageFilter dropped 2 of 4 rows" in caplog.text
    from twinkle.preprocessor import LengthFilter

    with pytest.raises(BadRowError, match="row 0: field 'length'.*encode"):
        dataset.filter(LengthFilter(max_length=40))
    dataset.set_template(template)
    dataset.encode()
    dataset.filter(LengthFilter(max_length=40))
    assert len(dataset) == 1 and dataset[0]["length"] <= 40
    dataset.filter(lambda row: row["length"] > 1000)  # plain functions work too
    assert len(dataset) == 0


def test_a_plain_function_preprocessor_and_name_with_kwargs():
    dataset = _dataset(rows=[{"q": "a", "a": "b"}])
    dataset.map(
        lambda rows: [
            {"messages": [{"role": "user", "content": r["q"]}, {"role": "assistant", "content": r["a"]}]} for r in rows
        ]
    )
    assert dataset[0]["messages"][1]["content"] == "b"
    from twinkle.registry import ComponentNotFoundError

    with pytest.raises(ComponentNotFoundError, match="AlpacaProcessor"):
        dataset.map("AlpacaProcesor")
