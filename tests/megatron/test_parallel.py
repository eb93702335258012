"""DeviceMesh -> megatron parallel state, and the CPU shims (applied only while needed, reversibly)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from twinkle.mesh import DeviceMesh, MeshError
from twinkle_megatron import compat, parallel


def test_shims_are_reversible_and_counted() -> None:
    from megatron.core.transformer.moe import moe_utils

    original = torch.cuda.current_device
    had_gemm = hasattr(moe_utils, "te_general_gemm")
    depth_before = compat.active()
    compat.apply("cpu")
    compat.apply("cpu")
    assert torch.cuda.current_device() == "cpu"
    assert hasattr(moe_utils, "te_general_gemm")
    compat.restore()
    assert torch.cuda.current_device() == "cpu"  # still one user
    compat.restore()
    if not depth_before:
        assert torch.cuda.current_device is original
        assert hasattr(moe_utils, "te_general_gemm") == had_gemm
    with pytest.raises(ValueError, match="device_type"):
        compat.apply("tpu")


def test_mesh_maps_onto_parallel_state() -> None:
    from megatron.core import parallel_state as ps

    with compat.megatron_on_device("cpu"):
        sizes = parallel.init_megatron_parallel(DeviceMesh.from_sizes(dp_size=1), "cpu")
        assert (sizes.tp, sizes.pp, sizes.cp, sizes.ep, sizes.dp) == (1, 1, 1, 1, 1)
        assert ps.model_parallel_is_initialized()
        assert ps.get_tensor_model_parallel_world_size() == 1
        assert ps.get_data_parallel_world_size() == 1


@pytest.mark.parametrize(
    ("mesh", "match"),
    [
        (DeviceMesh.from_sizes(sp_size=1, tp_size=2), "needs 2 processes"),
        (DeviceMesh(sp=2), "sp_size"),
        (DeviceMesh(pp=2), "pipeline parallelism"),
        (DeviceMesh(cp=2), "Transformer Engine"),
    ],
)
def test_meshes_that_cannot_work_are_refused(mesh: DeviceMesh, match: str) -> None:
    with compat.megatron_on_device("cpu"), pytest.raises(MeshError, match=match):
        parallel.init_megatron_parallel(mesh, "cpu")


_TP2_SCRIPT = r"""
import json, os, sys, torch
from twinkle.mesh import DeviceMesh
from twinkle_megatron.model import MegatronModel
from twinkle.model.transformers_model import TransformersModel
cfg = json.loads(sys.argv[1]); rows = json.loads(sys.argv[2]); out_dir = sys.argv[3]
mg = MegatronModel(config=cfg, device="cpu", seed=5, device_mesh=DeviceMesh.from_sizes(tp_size=2))
mg.set_optimizer("AdamW", lr=1e-2)
losses = []
for step in range(3):
    losses.append(mg.forward_backward(inputs=rows).loss)
    losses.append(mg.clip_grad_and_step(max_grad_norm=1.0)["grad_norm"])
shard = mg.model.decoder.layers[0].self_attention.linear_qkv.weight.shape[0]
path = mg.save(os.path.join(out_dir, "tp2"), save_optimizer=False)
if int(os.environ["RANK"]) == 0:
    json.dump({"losses": losses, "qkv_rows": shard}, open(os.path.join(out_dir, "result.json"), "w"))
"""


def test_tensor_parallel_two_gloo_processes_match_one(rows, tmp_path) -> None:
    """torchrun --nproc_per_node 2 with tp_size=2 on CPU: same losses and saved weights as one process."""
    import json

    from twinkle.model.transformers_model import TransformersModel

    from conftest import tiny_config

    cfg = tiny_config("qwen2")
    script = tmp_path / "tp2.py"
    script.write_text(_TP2_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    from twinkle_megatron.parallel import _free_port

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(script),
        json.dumps(cfg),
        json.dumps(rows),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["qkv_rows"] == (4 + 2 * 2) * 16 // 2  # the fused qkv weight is split over 2 ranks
    single = TransformersModel(config=cfg, device="cpu", attn_implementation="eager", seed=5)
    single.set_optimizer("AdamW", lr=1e-2)
    expected = []
    for _ in range(3):
        expected.append(single.forward_backward(inputs=rows).loss)
        expected.append(single.clip_grad_and_step(max_grad_norm=1.0)["grad_norm"])
    print("tp=2 losses/grad norms", result["losses"], "single process", expected)
    assert result["losses"] == pytest.approx(expected, abs=1e-4)
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(Path(tmp_path / "tp2")).state_dict()
    trained = single.get_state_dict()
    for key, value in trained.items():
        assert torch.allclose(saved[key], value, atol=1e-4), key
