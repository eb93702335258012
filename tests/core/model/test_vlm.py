"""Vision-language models end to end on tiny random configs: LoRA training on the language model with
the vision side frozen, batches that keep each row's images, sampling with images, the example.

The rows of docs/model.md's family table marked "VLM test" come from here.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("PIL")
import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from twinkle.model.transformers_model import TransformersModel  # noqa: E402
from twinkle.model.vision import vision_module_names  # noqa: E402
from twinkle.template.tiny_vlm import TINY_VLM_FAMILIES, write_tiny_vlm  # noqa: E402
from twinkle.template.vision import VisionTemplate  # noqa: E402

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def row(colour, size=(16, 16), question="<image>What colour is the square?"):
    image = np.full((*size, 3), 255, np.uint8)
    image[3:12, 3:12] = COLOURS[colour]
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": colour}],
        "images": [image],
    }


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    return {family: write_tiny_vlm(family, root / family) for family in TINY_VLM_FAMILIES}


@pytest.mark.parametrize("family", TINY_VLM_FAMILIES)
def test_vlm_lora_trains_the_language_model_with_the_vision_side_frozen(family, tiny_dirs, tmp_path):
    model = TransformersModel(model_id=tiny_dirs[family], seed=5)
    model.add_adapter_to_model("default", LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    model.set_template(VisionTemplate(tiny_dirs[family]))
    model.set_optimizer("AdamW", lr=1e-2)
    base = model._hf_model()
    vision = vision_module_names(base)
    assert vision and all(not name.startswith("model.language_model") for name in vision)
    lora = [n for n, _ in model.model.named_parameters() if "lora_" in n]
    assert lora and all("language_model" in n for n in lora)  # "all-linear" stayed off the vision side
    vision_before = {n: p.detach().clone() for n, p in base.named_parameters() if n.startswith(tuple(vision))}
    assert vision_before and not any(p.requires_grad for n, p in base.named_parameters() if n in vision_before)

    # a batch keeps each row's images: the summed loss of [a, b, c] equals the rows' losses one by one
    rows = [row("red"), row("green", size=(24, 16)), row("blue", question="Name it: <image>")]
    together = model.forward_only(rows)
    alone = [model.forward_only([r]) for r in rows]
    total = sum(o.loss * o.num_tokens for o in alone)
    assert together.loss * together.num_tokens == pytest.approx(total, rel=1e-4)
    # the pixels reach the model: another colour, other log-probs of the same answer
    swapped = dict(rows[0], images=row("blue")["images"])
    assert abs(model.forward_only([swapped]).loss - alone[0].loss) > 1e-4

    losses = []
    for _ in range(5):
        losses.append(model.forward_backward(inputs=rows).loss)
        model.clip_grad_and_step()
    assert losses[-1] < losses[0] - 0.1
    for name, tensor in base.named_parameters():
        if name in vision_before:
            assert torch.equal(tensor.detach(), vision_before[name]), name

    before = model.forward_only(rows)
    path = model.save(tmp_path / family, save_optimizer=False)
    fresh = TransformersModel(model_id=tiny_dirs[family], seed=5)
    fresh.set_template(VisionTemplate(tiny_dirs[family]))
    fresh.load(path)
    assert fresh.forward_only(rows).loss == pytest.approx(before.loss, rel=1e-5)


def test_full_training_leaves_the_vision_tower_and_freeze_vision_false_trains_it(tiny_dirs):
    directory = tiny_dirs["qwen2_5_vl"]
    rows = [row("red"), row("blue")]
    model = TransformersModel(model_id=directory, seed=1)
    model.set_template(VisionTemplate(directory))
    model.set_optimizer("AdamW", lr=1e-2)
    base = model._hf_model()
    snapshot = {n: p.detach().clone() for n, p in base.named_parameters()}
    model.forward_backward(inputs=rows)
    model.clip_grad_and_step()
    changed = {n for n, p in base.named_parameters() if not torch.equal(p.detach(), snapshot[n])}
    assert changed and all(n.startswith("model.language_model") or n.startswith("lm_head") for n in changed)

    unfrozen = TransformersModel(model_id=directory, seed=1, freeze_vision=False)
    unfrozen.add_adapter_to_model("default", LoraConfig(r=4, target_modules="all-linear"))
    assert any("visual" in n and "lora_" in n for n, _ in unfrozen.model.named_parameters())


@pytest.mark.parametrize("family", TINY_VLM_FAMILIES)
def test_torch_sampler_samples_with_images(family, tiny_dirs):
    """Sampling sees the image: its log-probs equal compute_logps of the sampled rows (which carry the
    pixel values) and the trainer's forward_only on the same weights; without the image they differ."""
    from twinkle.data_format.sampling import SamplingParams
    from twinkle.sampler import TorchSampler

    directory = tiny_dirs[family]
    sampler = TorchSampler(model_id=directory, device="cpu", seed=42)
    assert isinstance(sampler._template, VisionTemplate)
    prompts = [
        {"messages": [row("red")["messages"][0]], "images": row("red")["images"]},
        {
            "messages": [row("blue", size=(24, 16), question="a longer question <image> here")["messages"][0]],
            "images": row("blue", size=(24, 16))["images"],
        },
    ]
    responses = sampler.sample(prompts, SamplingParams(max_tokens=4, num_samples=2, seed=0, logprobs=True))
    sequences = [s for r in responses for s in r.sequences]
    assert all(len(s.tokens) > 0 and "pixel_values" in s.input_feature for s in sequences)
    logps = sampler.compute_logps([s.input_feature for s in sequences])
    for seq, lp in zip(sequences, logps):
        assert [x for x in lp if x != 0.0] == pytest.approx(seq.logprobs, abs=1e-4)
    blind = {
        k: v
        for k, v in sequences[0].input_feature.items()
        if k not in ("pixel_values", "image_grid_thw", "high_res_pixel_values")
    }
    blind["mm_token_type_ids"] = None
    blind_lp = [x for x in sampler.compute_logps([blind])[0] if x != 0.0]
    assert max(abs(a - b) for a, b in zip(blind_lp, sequences[0].logprobs)) > 1e-4

    trainer = TransformersModel(model_id=directory, seed=42)
    trained_view = trainer.forward_only([s.input_feature for s in sequences[:2]])
    for seq, lp in zip(sequences[:2], trained_view.logps):
        labelled = [x for x, label in zip(lp, seq.input_feature["labels"]) if label != -100]
        assert labelled == pytest.approx(seq.logprobs, abs=1e-4)


def test_vlm_example_learns_the_colour_of_a_square(tmp_path, monkeypatch):
    """examples/vlm_colour.py: held-out accuracy from chance (1/3) to clearly above it, on CPU."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[3] / "examples"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    import vlm_colour
    from twinkle.testing import torch_threads

    with torch_threads(1):
        result = vlm_colour.main(["--workdir", str(tmp_path), "--eval-images", "24"])
    assert result["accuracy_before"] <= 0.5
    assert result["accuracy_after"] >= 0.6
    assert result["accuracy_after"] >= result["accuracy_before"] + 0.25
