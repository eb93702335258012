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


def test_packed_rows_give_the_same_per_token_loss_as_padded_rows(data_file, tiny_dir):
    """PackingDataset rows through the model side's InputProcessor, on a tiny random Qwen2."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from twinkle.dataset import Dataset
    from twinkle.processor.base import InputProcessor

    meta = DatasetMeta(data_file("alpaca_tiny.jsonl"), data_slice=range(12))
    plain = Dataset(dataset_meta=meta)
    plain.set_template("Template", model_id=tiny_dir, max_length=128, truncation_strategy="right")
    plain.map("AlpacaProcessor").encode()
    packed = PackingDataset(dataset_meta=meta)
    packed.set_template("Template", model_id=tiny_dir, max_length=128, truncation_strategy="right")
    packed.map("AlpacaProcessor").encode()
    assert len(packed) < len(plain)

    config = AutoConfig.from_pretrained(tiny_dir)
    config.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "_attn_implementation": "sdpa"})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()

    def token_losses(rows):
        batch = InputProcessor(pad_token_id=0)(list(rows))
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=None if "position_ids" in rows[0] else batch["attention_mask"],
                position_ids=batch["position_ids"],
                use_cache=False,  # transformers detects packed sequences only without a cache
            ).logits
        labels = batch["shift_labels"]
        losses = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none"
        )
        return losses[labels.flatten() != -100]

    padded = token_losses(list(plain))
    packed_losses = torch.cat([token_losses([row]) for row in packed])
    assert padded.numel() == packed_losses.numel() > 100
    torch.testing.assert_close(packed_losses.sort().values, padded.sort().values, rtol=1e-4, atol=1e-4)
