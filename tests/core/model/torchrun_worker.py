"""Worker for test_torchrun.py: the same loop under `python` (1 process) and `torchrun` (N processes).

usage: torchrun_worker.py OUT_JSON MODEL_DIR {dp,fsdp} {lora,full}
"""

from __future__ import annotations

import json
import sys

import twinkle
from model_test_utils import make_rows
from twinkle import DeviceMesh
from twinkle.dispatch import slice_for_data_rank
from twinkle.launcher.local import torchrun_world
from twinkle.model.transformers_model import TransformersModel


def main() -> None:
    out_path, model_dir, layout, kind = sys.argv[1:5]
    rank, _, world = torchrun_world()
    mesh = DeviceMesh.from_sizes(fsdp_size=world) if layout == "fsdp" else DeviceMesh.from_sizes(dp_size=world)
    twinkle.initialize(mode="local", global_device_mesh=mesh, seed=0)
    model = TransformersModel(model_id=model_dir)
    if kind == "lora":
        from peft import LoraConfig

        model.add_adapter_to_model("default", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), 2)
    else:
        model.state_of().gradient_accumulation_steps = 2
    model.set_optimizer("AdamW", lr=1e-2)
    losses, norms = [], []
    for step in range(6):
        batch = make_rows(4, seed=step)  # the global batch; each data rank takes its slice
        local = slice_for_data_rank(batch, mesh.data_rank(rank), mesh.data_world_size)
        losses.append(model.forward_backward(inputs=local).loss)
        result = model.clip_grad_and_step()
        if result["stepped"]:
            norms.append(result["grad_norm"])
    metric = model.calculate_metric()
    saved = model.save(out_path + ".ckpt")
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"losses": losses, "norms": norms, "metric_loss": metric["loss"], "saved": saved}, f)
    twinkle.shutdown()


if __name__ == "__main__":
    main()
