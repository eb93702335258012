"""InputProcessor: padding, padding-free packing, shifted labels and extra loss fields."""

from __future__ import annotations

import pytest
import torch
from twinkle.processor.base import InputProcessor


def test_padding_masks_labels_and_shifts_within_rows():
    batch = InputProcessor(pad_token_id=7)(
        [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, 5, -100]]
    assert batch["shift_labels"].tolist() == [[2, 3, -100], [5, -100, -100]]
    assert batch["row_ids"].tolist() == [[0, 0, 0], [1, 1, -1]]


def test_packing_restarts_positions_and_never_predicts_across_sequences():
    rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    batch = InputProcessor(padding_free=True)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["shift_labels"].tolist() == [[2, 3, -100, 5, -100]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == 3
    assert "attention_mask" not in batch


def test_packed_row_with_position_ids_splits_sequences():
    row = {"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5], "position_ids": [0, 1, 2, 0, 1]}
    packed = InputProcessor(padding_free=True)([row])
    assert packed["shift_labels"].tolist() == [[2, 3, -100, 5, -100]]
    assert packed["cu_seq_lens_k"].tolist() == [0, 3, 5]
    # the padded layout cannot keep a row's sequences apart with a 2D mask: such batches are packed
    default = InputProcessor()([row, {"input_ids": [6, 7], "labels": [6, 7]}])
    assert "attention_mask" not in default
    assert default["cu_seq_lens_q"].tolist() == [0, 3, 5, 7]
    assert default["row_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1]]
    # rows of one sequence each keep the padded layout
    assert "attention_mask" in InputProcessor()([{"input_ids": [1, 2], "position_ids": [0, 1]}, {"input_ids": [3]}])


def test_a_packed_row_gives_the_loss_of_its_sequences_with_any_processor(tiny_model_dir):
    """PackingDataset-style rows through the default processor: no attention across sequences."""
    from model_test_utils import make_rows
    from twinkle.model.transformers_model import TransformersModel

    rows = make_rows(3, seed=1)
    packed = {
        "input_ids": sum((r["input_ids"] for r in rows), []),
        "labels": sum((r["labels"] for r in rows), []),
        "position_ids": sum((list(range(len(r["input_ids"]))) for r in rows), []),
    }
    for patches in (None, []):
        model = TransformersModel(model_id=tiny_model_dir, patches=patches)
        separate = model.forward_only(rows)
        together = model.forward_only([packed])
        assert together.num_tokens == separate.num_tokens
        assert together.loss == pytest.approx(separate.loss, rel=1e-5)


def test_set_processor_before_the_adapter_still_holds(tiny_model_dir):
    from twinkle.model.transformers_model import TransformersModel

    model = TransformersModel(model_id=tiny_model_dir)
    model.set_processor("PaddingFreeProcessor")
    model.add_adapter_to_model("default", {"r": 4, "target_modules": "all-linear"})
    assert model._state(None).processor.padding_free


def test_extra_fields_broadcast_and_shift():
    rows = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "advantages": 0.5, "old_logps": [0.0, -1.0, -2.0]},
        {"input_ids": [4, 5], "labels": [-100, 5], "advantages": -1.0, "old_logps": [0.0, -3.0], "messages": "x"},
    ]
    batch = InputProcessor()(rows)
    assert batch["advantages"].tolist() == [[0.5, 0.5, 0.5], [-1.0, -1.0, 0.0]]
    assert batch["old_logps"].tolist() == [[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]]
    assert "messages" not in batch


def test_bad_rows_are_named():
    with pytest.raises(ValueError, match="row 1 has no 'input_ids'"):
        InputProcessor()([{"input_ids": [1]}, {"messages": []}])
    with pytest.raises(ValueError, match="row 0: labels has 2 entries"):
        InputProcessor()([{"input_ids": [1, 2, 3], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="empty"):
        InputProcessor()([])


def test_packed_and_padded_give_the_same_loss(tiny_model_dir):
    from model_test_utils import make_rows
    from twinkle.model.transformers_model import TransformersModel

    model = TransformersModel(model_id=tiny_model_dir)
    rows = make_rows(5, seed=3)
    padded = model.forward_only(rows)
    model.set_processor("PaddingFreeProcessor")
    packed = model.forward_only(rows)
    assert packed.num_tokens == padded.num_tokens
    assert packed.loss == pytest.approx(padded.loss, rel=1e-5)
    for a, b in zip(packed.logps, padded.logps):
        assert a == pytest.approx(b, abs=1e-4)
