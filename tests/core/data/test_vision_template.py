"""Images in rows -> tokens + pixel values: VisionTemplate against each family's own transformers processor.

Every family (Qwen2.5-VL, Qwen3-VL, GLM-4V, DeepSeek-VL, DeepSeek-VL hybrid) gets a tiny model
directory written in code (the bundled tokenizer with the family's image tokens, an image
processor config), and images generated here.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402
from twinkle.template import ImageLoadError, TemplateError  # noqa: E402
from twinkle.template.tiny_vlm import TINY_VLM_FAMILIES, write_tiny_vlm  # noqa: E402
from twinkle.template.vision import VisionTemplate, load_image, split_images  # noqa: E402


def square(colour, size=(16, 16)):
    image = np.full((size[0], size[1], 3), 255, np.uint8)
    image[4:12, 4:12] = colour
    return image


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    return {family: write_tiny_vlm(family, root / family) for family in TINY_VLM_FAMILIES}


# ---------------------------------------------------------------------------- images
def test_load_image_reads_paths_arrays_bytes_and_dicts(tmp_path):
    array = square((255, 0, 0))
    path = tmp_path / "red.png"
    Image.fromarray(array).save(path)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    for value in (
        str(path),
        path,
        f"file://{path}",
        Image.fromarray(array),
        array,
        array.astype(np.float32) / 255.0,
        buffer.getvalue(),
        {"path": str(path), "bytes": None},
        {"bytes": buffer.getvalue(), "path": None},
        array.tolist(),
    ):
        image = load_image(value)
        assert image.mode == "RGB" and image.size == (16, 16)
        assert np.array_equal(np.asarray(image), array), type(value)


def test_urls_are_refused_offline_naming_the_fix():
    with pytest.raises(ImageLoadError, match="URL.*Download the images first.*local file paths"):
        load_image("https://example.com/cat.png")
    with pytest.raises(ImageLoadError, match="no image file"):
        load_image("/no/such/image.png")
    with pytest.raises(ImageLoadError, match="cannot read an image from int"):
        load_image(3)


def test_split_images_placeholders_parts_and_leading_images():
    a, b, c = object(), object(), object()
    row = {"messages": [{"role": "user", "content": "one <image> two <image>"}], "images": [a, b]}
    out, images = split_images(row)
    assert images == [a, b] and out["messages"][0]["content"] == "one <image> two <image>"
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image", "image": a}]},
            {"role": "assistant", "content": "y"},
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": b}}, {"type": "text", "text": "z"}],
            },
        ]
    }
    out, images = split_images(parts)
    assert images == [a, b]
    assert [m["content"] for m in out["messages"]] == ["x<image>", "y", "<image>z"]
    out, images = split_images({"messages": [{"role": "user", "content": "what?"}], "images": [a, c]})
    assert images == [a, c] and out["messages"][0]["content"] == "<image><image>what?"
    with pytest.raises(TemplateError, match="2 '<image>' placeholders but 1 images"):
        split_images({"messages": [{"role": "user", "content": "<image><image>"}], "images": [a]})


# ---------------------------------------------------------------------------- the template
@pytest.mark.parametrize("family", TINY_VLM_FAMILIES)
def test_template_equals_the_family_processor(family, tiny_dirs):
    """input_ids, pixel values and grids equal what the model's own processor makes of the same text and
    images; labels cover the assistant's answer only, never image tokens."""
    template = VisionTemplate(tiny_dirs[family])
    images = [square((255, 0, 0)), square((0, 0, 255), size=(24, 16))]
    row = {
        "messages": [
            {"role": "user", "content": "<image>What colour?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "And <image>?"},
            {"role": "assistant", "content": "blue"},
        ],
        "images": images,
    }
    feature = template.encode(row)
    image_text = template.family.image_text
    text = template.tokenizer.apply_chat_template(
        [
            {"role": "user", "content": image_text + "What colour?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": f"And {image_text}?"},
            {"role": "assistant", "content": "blue"},
        ],
        tokenize=False,
    )
    reference = template.processor(text=[text], images=images, return_tensors="np")
    assert feature["input_ids"] == reference["input_ids"][0].tolist()
    for key in ("pixel_values", "image_grid_thw", "high_res_pixel_values"):
        assert (key in feature) == (key in reference), key
        if key in feature:
            np.testing.assert_array_equal(np.asarray(feature[key]), reference[key])
    image_id = template.tokenizer.convert_tokens_to_ids(template.family.image_token)
    n_image_tokens = feature["input_ids"].count(image_id)
    assert n_image_tokens > 2  # expanded: more than one token per image
    if template.family.token_types:
        assert feature["mm_token_type_ids"] == [int(t == image_id) for t in feature["input_ids"]]
    labelled = [t for t, label in zip(feature["input_ids"], feature["labels"]) if label != -100]
    assert image_id not in labelled
    assert template.decode(labelled, skip_special_tokens=False) == "red<|im_end|>blue<|im_end|>"


def test_template_without_images_and_missing_tokens(tiny_dirs, tmp_path):
    template = VisionTemplate(tiny_dirs["qwen2_5_vl"])
    feature = template.encode({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    assert "pixel_values" not in feature and set(feature["mm_token_type_ids"]) == {0}
    with pytest.raises(TemplateError, match="do not write <\\|image_pad\\|> in message text"):
        template.encode({"messages": [{"role": "user", "content": "<|image_pad|>"}], "images": []})
    from twinkle import assets

    plain = VisionTemplate(str(assets.path("tiny-qwen2")), model_type="qwen2_5_vl")
    with pytest.raises(TemplateError, match="lacks the qwen2_5_vl image tokens"):
        plain.encode({"messages": [{"role": "user", "content": "<image>"}], "images": [square((1, 2, 3))]})
    with pytest.raises(TemplateError, match="no vision path for model_type 'qwen2'"):
        _ = VisionTemplate(str(assets.path("tiny-qwen2"))).family


def test_truncation_never_cuts_an_image(tiny_dirs):
    row = {"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}]}
    row["images"] = [square((0, 255, 0))]
    full = VisionTemplate(tiny_dirs["qwen2_5_vl"]).encode(row)["length"]
    with pytest.raises(TemplateError, match="would split an image from its pixels"):
        VisionTemplate(tiny_dirs["qwen2_5_vl"], max_length=full - 1, truncation_strategy="left").encode(row)
    dropping = VisionTemplate(tiny_dirs["qwen2_5_vl"], max_length=full - 1, truncation_strategy="delete")
    assert dropping.encode_rows([row]) == [None]


def test_dataset_encodes_image_rows_from_files(tiny_dirs, tmp_path):
    """A jsonl data set naming PNG files: Dataset.encode stores the pixel values; the InputProcessor
    concatenates them in row order, pads the token types, and gives no position_ids (the model's own)."""
    from twinkle.dataset import Dataset, DatasetMeta
    from twinkle.processor import InputProcessor

    rows = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(square(colour, size=(16, 16 + 8 * i))).save(path)
        rows.append(
            {
                "messages": [{"role": "user", "content": "<image>colour?"}, {"role": "assistant", "content": "c"}],
                "images": [str(path)],
            }
        )
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = Dataset(dataset_meta=DatasetMeta(str(data)))
    dataset.set_template("VisionTemplate", model_id=tiny_dirs["qwen2_5_vl"])
    dataset.encode()
    encoded = [dataset[i] for i in range(len(dataset))]
    direct = [VisionTemplate(tiny_dirs["qwen2_5_vl"]).encode(r) for r in rows]
    for stored, fresh in zip(encoded, direct):
        assert stored["input_ids"] == fresh["input_ids"]
        np.testing.assert_allclose(np.asarray(stored["pixel_values"]), fresh["pixel_values"], rtol=0, atol=1e-6)
    batch = InputProcessor()(encoded)
    assert "position_ids" not in batch
    np.testing.assert_allclose(
        batch["pixel_values"].numpy(), np.concatenate([f["pixel_values"] for f in direct]), rtol=0, atol=1e-6
    )
    assert batch["image_grid_thw"].tolist() == [list(f["image_grid_thw"][0]) for f in direct]
    width = batch["input_ids"].shape[1]
    for row, f in enumerate(direct):
        n = len(f["input_ids"])
        assert batch["mm_token_type_ids"][row].tolist() == f["mm_token_type_ids"] + [0] * (width - n)
    with pytest.raises(ValueError, match="cannot be packed"):
        InputProcessor(padding_free=True)(encoded)
