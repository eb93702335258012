"""Dataset: loading (files, dirs, rows), slicing, mixing, encode errors and drops, saving."""

from __future__ import annotations

import json
import logging
import os

import pytest
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.template.base import SequenceTooLongError, TemplateError

QA = [{"instruction": f"say {i}", "input": "", "output": "ok " * (i + 1)} for i in range(6)]


def test_data_slice_oversamples_and_slices(data_file):
    path = data_file("alpaca_tiny.jsonl")
    over = Dataset(dataset_meta=DatasetMeta(path, data_slice=range(100)))
    assert len(over) == 100 and over[40] == over[0] and over[41] == over[1]
    part = Dataset(dataset_meta=DatasetMeta(path, data_slice=slice(5, 1000)))
    assert len(part) == 35 and part[0] == over[5]
    picked = Dataset(dataset_meta=DatasetMeta(path, data_slice=[3, 3, 1]))
    assert [r["instruction"] for r in picked] == [over[3]["instruction"]] * 2 + [over[1]["instruction"]]
    with pytest.raises(IndexError, match="out of range"):
        part[35]


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl", "dir"])
def test_local_formats(tmp_path, suffix):
    import datasets

    source = datasets.Dataset.from_list(QA)
    if suffix == ".csv":
        path = tmp_path / "d.csv"
        source.to_csv(path)
    elif suffix == ".parquet":
        path = tmp_path / "d.parquet"
        source.to_parquet(path)
    elif suffix == ".jsonl":
        path = tmp_path / "d.jsonl"
        source.to_json(path)
    else:
        path = tmp_path / "dir"
        path.mkdir()
        source.select(range(3)).to_json(path / "a.jsonl")
        source.select(range(3, 6)).to_json(path / "b.jsonl")
    dataset = Dataset(dataset_meta=DatasetMeta(str(path)))
    assert len(dataset) == 6 and sorted(r["instruction"] for r in dataset) == sorted(r["instruction"] for r in QA)


def test_unknown_file_type_and_missing_split(tmp_path):
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="unknown file type '.xml'"):
        Dataset(dataset_meta=DatasetMeta(str(tmp_path / "x.xml")))
    (tmp_path / "x.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(ValueError, match="only has the 'train' split"):
        Dataset(dataset_meta=DatasetMeta(str(tmp_path / "x.jsonl"), split="test"))


def test_mix_interleave_and_concat(data_file, template):
    def build():
        dataset = Dataset(dataset_meta=DatasetMeta(data_file("alpaca_tiny.jsonl"), data_slice=range(4)))
        key = dataset.add_dataset(DatasetMeta(data_file("sharegpt_tiny.jsonl"), data_slice=range(6)))
        dataset.map("AlpacaProcessor", dataset_meta=data_file("alpaca_tiny.jsonl"))
        dataset.map("MessagesProcessor", dataset_meta=key)
        return dataset

    dataset = build()
    with pytest.raises(ValueError, match="holds 2 parts.*mix_dataset"):
        len(dataset)
    alpaca_first = dataset.parts[data_file("alpaca_tiny.jsonl")][0]["messages"]
    sharegpt_first = dataset.parts[data_file("sharegpt_tiny.jsonl")][0]["messages"]
    dataset.mix_dataset("interleave")
    assert len(dataset) == 8  # stops when the shorter part runs out: 4 + 4
    assert dataset[0]["messages"] == alpaca_first and dataset[1]["messages"] == sharegpt_first
    concat = build().mix_dataset("concat")
    assert len(concat) == 10 and concat[4]["messages"] == sharegpt_first
    every = build().mix_dataset("interleave", stopping_strategy="all_exhausted")
    assert len(every) == 12
    concat.set_template(template)
    concat.encode()
    assert all(r["labels"] for r in concat)


def test_mixing_parts_of_different_formats_is_a_clear_error(data_file):
    dataset = Dataset(dataset_meta=DatasetMeta(data_file("alpaca_tiny.jsonl")))
    dataset.add_dataset(DatasetMeta(data_file("gsm8k_tiny.jsonl")))
    with pytest.raises(ValueError, match="different columns.*map every part to the same format"):
        dataset.mix_dataset("concat")
    with pytest.raises(ValueError, match="already loaded"):
        dataset.add_dataset(DatasetMeta(data_file("gsm8k_tiny.jsonl")))


def test_encode_needs_a_template_and_names_the_bad_row(template):
    dataset = Dataset(dataset_meta=DatasetMeta("rows", rows=QA))
    with pytest.raises(ValueError, match="set_template"):
        dataset.encode()
    dataset.set_template(template)
    with pytest.raises(TemplateError, match="row 0: field 'messages' is missing.*map the data set with a Preprocessor"):
        dataset.encode()
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    rows = [good] * 4 + [{"messages": []}] + [good]
    dataset = Dataset(dataset_meta=DatasetMeta("rows", rows=rows))
    dataset.set_template(template)
    with pytest.raises(TemplateError, match="row 4: field 'messages' is missing or empty"):
        dataset.encode(batch_size=3)  # the bad row is the second of the second batch


def test_encode_delete_drops_and_counts(tiny_dir, caplog):
    dataset = Dataset(dataset_meta=DatasetMeta("rows", rows=QA)).map("AlpacaProcessor")
    dataset.set_template("Template", model_id=tiny_dir, max_length=40, truncation_strategy="raise")
    with pytest.raises(SequenceTooLongError, match=r"row \d: \d+ tokens is longer than max_length=40"):
        dataset.encode()
    dataset.set_template("Template", model_id=tiny_dir, max_length=40, truncation_strategy="delete")
    with caplog.at_level(logging.WARNING, logger="twinkle.dataset"):
        dataset.encode()
    assert 0 < len(dataset) < 6 and all(r["length"] <= 40 for r in dataset)
    assert f"dropped {6 - len(dataset)} of 6 rows" in caplog.text


def test_encode_with_worker_processes_matches_one_process(data_file, template):
    def encoded(num_proc):
        dataset = Dataset(dataset_meta=DatasetMeta(data_file("gsm8k_tiny.jsonl")))
        dataset.map("GSM8KProcessor", with_answer=True, num_proc=num_proc)
        dataset.set_template(template)
        return list(dataset.encode(num_proc=num_proc, batch_size=16, load_from_cache_file=False))

    assert encoded(2) == encoded(None)


def test_save_and_reload(tmp_path, data_file, template):
    dataset = Dataset(dataset_meta=DatasetMeta(data_file("dpo_tiny.jsonl"))).map("DPOProcessor")
    dataset.set_template(template)
    dataset.encode()
    for name in ("saved", "saved.jsonl", "saved.parquet"):
        path = dataset.save(tmp_path / name)
        again = Dataset(dataset_meta=DatasetMeta(path))
        assert len(again) == len(dataset)
        assert again[5]["input_ids"] == dataset[5]["input_ids"] and again[5]["labels"] == dataset[5]["labels"]
        assert again[5]["messages"] == dataset[5]["messages"]
    assert sorted(os.listdir(tmp_path)) == ["saved", "saved.jsonl", "saved.parquet"]  # no temp leftovers
    with pytest.raises(FileExistsError, match="overwrite=True"):
        dataset.save(tmp_path / "saved")
    dataset.filter(lambda row: row["length"] < 40)
    dataset.save(tmp_path / "saved", overwrite=True)
    assert len(Dataset(dataset_meta=DatasetMeta(str(tmp_path / "saved")))) == len(dataset)
    lines = (tmp_path / "saved.jsonl").read_text(encoding="utf-8").splitlines()
    assert "你是谁" in "".join(lines) and json.loads(lines[0])["input_ids"]


def test_dataset_is_a_component_with_remote_methods():
    from twinkle.component import Component
    from twinkle.dataloader import DataLoader
    from twinkle.dispatch import remote_methods

    assert issubclass(Dataset, Component) and issubclass(DataLoader, Component)
    assert {"map", "filter", "encode", "set_template", "add_dataset", "mix_dataset", "save"} <= set(
        remote_methods(Dataset)
    )
    specs = remote_methods(DataLoader)
    assert specs["__iter__"].iterator and {"state_dict", "load_state_dict", "__len__"} <= set(specs)
    dataset = Dataset(dataset_meta=DatasetMeta("rows", rows=QA), remote_group="data", device_mesh=None)
    assert dataset.remote_group == "data"
