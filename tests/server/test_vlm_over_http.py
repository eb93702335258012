"""http mode with a vision-language base: rows with images (arrays over the wire) train a LoRA and
sample through `twinkle serve`, with the numbers of local mode.

The server serves a tiny random Qwen2.5-VL (twinkle.template.tiny_vlm) on CPU.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

pytest.importorskip("peft")
pytest.importorskip("PIL")

SEED = 0
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


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


def run(model_id: str, template_dir: str, remote: bool) -> dict:
    from peft import LoraConfig
    from twinkle.data_format import SamplingParams
    from twinkle.model import TransformersModel
    from twinkle.sampler import TorchSampler

    kwargs = {} if remote else {"seed": SEED, "device": "cpu"}
    model = TransformersModel(model_id=model_id, **kwargs)
    model.add_adapter_to_model("default", LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    model.set_template("VisionTemplate", model_id=template_dir)
    model.set_optimizer("AdamW", lr=1e-2)
    losses = []
    for _ in range(3):
        losses.append(float(model.forward_backward(inputs=rows()).loss))
        model.clip_grad_and_step()
    sampler = TorchSampler(model_id=model_id, **({} if remote else {"device": "cpu", "seed": SEED}))
    prompts = [{"messages": [r["messages"][0]], "images": r["images"]} for r in rows()[:2]]
    responses = sampler.sample(prompts, SamplingParams(max_tokens=3, num_samples=1, seed=SEED, logprobs=True))
    sequences = [r.sequences[0] for r in responses]
    return {
        "losses": losses,
        "features": [s.input_feature for s in sequences],
        "logprobs": [s.logprobs for s in sequences],
    }


def test_vlm_trains_and_samples_over_http(server_factory, tmp_path) -> None:
    import twinkle
    from twinkle.template.tiny_vlm import write_tiny_vlm
    from twinkle_server.config import ServerConfig

    model_dir = write_tiny_vlm("qwen2_5_vl", tmp_path / "tiny-qwen2_5_vl")
    with twinkle.initialize(mode="local", seed=SEED):
        expected = run(model_dir, model_dir, remote=False)
    config = ServerConfig(
        state_dir=tmp_path / "serve",
        model_dir=model_dir,
        model_name="twinkle/tiny-qwen2_5_vl",
        max_adapters=4,
        max_rank=8,
        long_poll_s=2.0,
        device="cpu",
        seed=SEED,
    )
    running = server_factory(config)
    try:
        key = running.add_tenant(f"vlm-{uuid.uuid4().hex[:6]}")
        with twinkle.initialize(mode="http", base_url=running.url, api_key=key):
            got = run(config.model_name, model_dir, remote=True)
    finally:
        running.stop()
    # the first loss (LoRA B = 0: the base model on these rows) is local mode's: the same base weights and the
    # same images reached the server; later steps differ slightly (the server seeds each tenant's LoRA A itself)
    assert got["losses"][0] == pytest.approx(expected["losses"][0], rel=1e-5)
    assert got["losses"][-1] < got["losses"][0] - 0.2
    # the server's sampler saw the images: a local sampler on the same base weights scores the server's sampled
    # rows (which carry their pixel values back) as the server did
    from twinkle.sampler import TorchSampler

    with twinkle.initialize(mode="local", seed=SEED):
        local = TorchSampler(model_id=model_dir, device="cpu", seed=SEED)  # the server seeds it with its seed
        for feature, logprobs in zip(got["features"], got["logprobs"]):
            assert "pixel_values" in feature and "image_grid_thw" in feature
            scored = [x for x in local.compute_logps([feature])[0] if x != 0.0]
            assert scored == pytest.approx(logprobs, abs=1e-4)
