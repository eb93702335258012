"""A vision-language model on Ray gives the numbers of local mode: images in rows travel to the actors.

Tiny random Qwen2.5-VL (twinkle.template.tiny_vlm), rows with images as arrays: the model on two
CPU actors (dp=2, each encodes and collates its half of the rows) and a TorchSampler on its own
actor sample with images; losses, reference log-probs and sampled tokens equal local mode's.
"""

from __future__ import annotations

import numpy as np
import pytest
import twinkle
from twinkle import DeviceGroup, DeviceMesh

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("PIL")

SEED = 7
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0)}


def rows():
    out = []
    for k, (name, colour) in enumerate(COLOURS.items()):
        image = np.full((16, 16 + 8 * (k % 2), 3), 255, np.uint8)
        image[3:12, 3:12] = colour
        out.append(
            {
                "messages": [
                    {"role": "user", "content": "<image>What colour is the square?"},
                    {"role": "assistant", "content": name},
                ],
                "images": [image],
            }
        )
    return out


def run(model_dir, model_group=None, sampler_group=None, model_mesh=None):
    from peft import LoraConfig
    from twinkle.data_format import SamplingParams
    from twinkle.model import TransformersModel
    from twinkle.sampler import TorchSampler

    model = TransformersModel(
        model_id=model_dir, seed=SEED, device="cpu", remote_group=model_group, device_mesh=model_mesh
    )
    model.add_adapter_to_model("default", LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    model.set_template("VisionTemplate", model_id=model_dir)
    model.set_optimizer("AdamW", lr=1e-2)
    losses = []
    for _ in range(3):
        losses.append(model.forward_backward(inputs=rows())["loss"])
        model.clip_grad_and_step()
    sampler = TorchSampler(model_id=model_dir, seed=SEED, device="cpu", remote_group=sampler_group)
    prompts = [{"messages": [r["messages"][0]], "images": r["images"]} for r in rows()[:2]]
    responses = sampler.sample(prompts, SamplingParams(max_tokens=3, num_samples=2, seed=SEED, logprobs=True))
    sequences = [seq for response in responses for seq in response.sequences]
    ref = model.forward_only(inputs=[seq.input_feature for seq in sequences], disable_adapters=True)["logps"]
    return {
        "losses": losses,
        "tokens": [s.tokens for s in sequences],
        "logprobs": [s.logprobs for s in sequences],
        "ref": ref,
    }


def test_vlm_on_ray_actors_matches_local(ray_cluster, tmp_path):
    from twinkle.template.tiny_vlm import write_tiny_vlm

    model_dir = write_tiny_vlm("qwen2_5_vl", tmp_path / "tiny-qwen2_5_vl")
    with twinkle.initialize(mode="local", seed=SEED):
        expected = run(model_dir)
    with twinkle.initialize(
        mode="ray",
        groups=[
            DeviceGroup(name="model", ranks=2, device_type="cpu"),
            DeviceGroup(name="sampler", ranks=1, device_type="cpu"),
        ],
        seed=SEED,
    ):
        got = run(model_dir, "model", "sampler", DeviceMesh.from_sizes(dp_size=2))
    assert got["losses"] == pytest.approx(expected["losses"], rel=1e-4, abs=1e-6)
    assert expected["losses"][-1] < expected["losses"][0]
    assert got["tokens"] == expected["tokens"]
    for mine, theirs in zip(got["logprobs"], expected["logprobs"]):
        assert mine == pytest.approx(theirs, abs=1e-5)
    assert len(got["ref"]) == 4
    for seq_ref, seq_lp, feature_tokens in zip(got["ref"], got["logprobs"], got["tokens"]):
        # the reference (base model, the images carried in the sampled rows) scores the sampled tokens as the
        # sampler did: same base weights, same images
        assert seq_ref[-len(feature_tokens) :] == pytest.approx(seq_lp, abs=1e-4)
