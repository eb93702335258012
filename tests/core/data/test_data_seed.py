"""The seed's data lines run unchanged except for the ids, and train exactly the assistant tokens."""

from __future__ import annotations

import json

from data_test_utils import trained_text


def test_seed_lines_encode_and_batch(seed_dataset, data_file):
    from twinkle.dataloader import DataLoader

    dataloader = DataLoader(dataset=seed_dataset, batch_size=8, min_batch_size=8)
    assert len(seed_dataset) == 1000
    assert len(dataloader) == 125  # 1000 rows / 8, no short tail
    raw = [json.loads(line) for line in open(data_file("self_cognition.jsonl"), encoding="utf-8")]
    template = seed_dataset.template
    batches = list(dataloader)
    assert len(batches) == 125 and all(len(b) == 8 for b in batches)
    for i, row in enumerate(batches[0] + batches[-1]):
        index = i if i < 8 else 992 + i - 8
        source = raw[index % len(raw)]
        expected = source["response"].replace("{{NAME}}", "twinkle大模型").replace("{{AUTHOR}}", "ModelScope社区")
        assert len(row["input_ids"]) == len(row["labels"]) == row["length"]
        # labels cover exactly the assistant content and its closing <|im_end|>
        assert trained_text(template, row) == expected + "<|im_end|>"
        text = template.decode(row["input_ids"], skip_special_tokens=False)
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
        assert "{{NAME}}" not in text and "{{AUTHOR}}" not in text


def test_trained_tokens_are_a_contiguous_suffix_span(seed_dataset):
    row = seed_dataset[3]
    trained = [i for i, t in enumerate(row["labels"]) if t != -100]
    assert trained == list(range(trained[0], trained[-1] + 1))
    assert trained[-1] == len(row["labels"]) - 2  # the final "\n" after <|im_end|> is not trained
    assert all(row["labels"][i] == row["input_ids"][i] for i in trained)
