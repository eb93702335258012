"""Streaming IterableDataset: the same rows as Dataset, lazily; batches and resume through DataLoader."""

from __future__ import annotations

import pytest
from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta, IterableDataset


def _pipeline(cls, data_file, template, **meta):
    dataset = cls(dataset_meta=DatasetMeta(data_file("sharegpt_tiny.jsonl"), **meta))
    dataset.set_template(template)
    dataset.map("MessagesProcessor").filter("EmptyMessageFilter").encode()
    return dataset


def test_streaming_rows_equal_the_map_style_rows(data_file, template):
    stream = _pipeline(IterableDataset, data_file, template, data_slice=range(2, 20))
    table = _pipeline(Dataset, data_file, template, data_slice=range(2, 20))
    rows = list(stream)
    assert len(rows) == len(table) == 18
    assert [r["input_ids"] for r in rows] == [r["input_ids"] for r in table]
    assert [r["labels"] for r in rows] == [r["labels"] for r in table]
    with pytest.raises(TypeError, match="no length"):
        len(stream)
    with pytest.raises(ValueError, match="contiguous data_slice"):
        IterableDataset(dataset_meta=DatasetMeta(data_file("sharegpt_tiny.jsonl"), data_slice=[1, 5]))


def test_streaming_batches_resume_and_mix(data_file, template):
    stream = _pipeline(IterableDataset, data_file, template)
    loader = DataLoader(stream, batch_size=5, min_batch_size=5)
    batches = list(loader)
    assert [len(b) for b in batches] == [5, 5, 5, 5]  # 24 rows: the short tail of 4 is dropped
    with pytest.raises(TypeError):
        len(loader)
    with pytest.raises(ValueError, match=r"dataset.shuffle\(seed="):
        DataLoader(stream, batch_size=5, shuffle=True)
    first = DataLoader(stream, batch_size=5)
    it = iter(first)
    next(it)
    next(it)
    state = first.state_dict()
    resumed = DataLoader(stream, batch_size=5)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [r["input_ids"] for b in rest for r in b] == [r["input_ids"] for b in batches[2:] for r in b] + [
        r["input_ids"] for r in list(stream)[20:]
    ]

    mixed = IterableDataset(dataset_meta=DatasetMeta(data_file("alpaca_tiny.jsonl"), data_slice=range(3)))
    mixed.add_dataset(DatasetMeta(data_file("self_cognition.jsonl"), data_slice=range(3)))
    mixed.map("AlpacaProcessor", dataset_meta=data_file("alpaca_tiny.jsonl"))
    mixed.map(
        "SelfCognitionProcessor", dataset_meta=data_file("self_cognition.jsonl"), name="T", author="M", system=None
    )
    mixed.mix_dataset("interleave")
    rows = list(mixed)
    # streaming 'first_exhausted' stops as soon as the first part runs out: a0 b0 a1 b1 a2
    assert len(rows) == 5 and all("T" in rows[i]["messages"][-1]["content"] for i in (1, 3))
    assert all(rows[i]["messages"][0]["content"].startswith(("Give", "What", "Translate")) for i in (0, 2, 4))
