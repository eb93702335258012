"""Packing: best-fit bins, packed rows with restarting position_ids, nothing lost."""

from __future__ import annotations

import random

import pytest
from twinkle.dataset import DatasetMeta, PackingDataset
from twinkle.dataset.packing import pack_bins


def test_pack_bins_is_a_partition_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = pack_bins(lengths, 128)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    lower_bound = -(-sum(lengths) // 128)
    assert len(bins) <= lower_bound * 1.1 + 1  # best-fit decreasing is near optimal
    assert pack_bins(lengths, 128) == bins  # deterministic
    assert pack_bins([3, 5, 2, 4], 8) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="row 1 has 9 tokens.*truncate"):
        pack_bins([3, 9], 8)


def test_packing_dataset_keeps_every_sequence(data_file, tiny_dir):
    from twinkle.dataset import Dataset

    plain = Dataset(dataset_meta=DatasetMeta(data_file("alpaca_tiny.jsonl")))
    plain.set_template("Template", model_id=tiny_dir, max_length=200, truncation_strategy="right")
    plain.map("AlpacaProcessor").encode()
    packed = PackingDataset(dataset_meta=DatasetMeta(data_file("alpaca_tiny.jsonl")))
    packed.set_template("Template", model_id=tiny_dir, max_length=200, truncation_strategy="right")
    packed.map("AlpacaProcessor").encode()
    assert set(packed.column_names) == {"input_ids", "labels", "position_ids", "length"}
    assert len(packed) < len(plain)
    sequences = []
    for row in packed:
        assert row["length"] == len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= 200
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [row["length"]]
        for a, b in zip(starts, starts[1:]):
            assert row["position_ids"][a:b] == list(range(b - a))
            sequences.append((tuple(row["input_ids"][a:b]), tuple(row["labels"][a:b])))
    expected = [(tuple(r["input_ids"]), tuple(r["labels"])) for r in plain]
    assert sorted(sequences) == sorted(expected)


def test_packing_needs_a_length(data_file, template):
    dataset = PackingDataset(dataset_meta=DatasetMeta(data_file("alpaca_tiny.jsonl")))
    dataset.set_template(template)
    dataset.map("AlpacaProcessor")
    with pytest.raises(ValueError, match="packing length"):
        dataset.encode()
    dataset.pack(packing_length=512)
    assert all(r["length"] <= 512 for r in dataset)
