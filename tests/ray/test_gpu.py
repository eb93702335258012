"""GPU placement: one GPU per rank, torchrun-style CUDA_VISIBLE_DEVICES/LOCAL_RANK, nccl all-reduce."""

from __future__ import annotations

import pytest
from ray_test_components import DeviceProbe
from twinkle import DeviceGroup


@pytest.mark.gpu
def test_two_gpu_ranks_use_distinct_devices_and_nccl(ray_cluster):
    import torch
    import twinkle

    if torch.cuda.device_count() < 2 or ray_cluster.cluster_resources().get("GPU", 0) < 2:
        pytest.skip("needs 2 GPUs in the Ray cluster")
    with twinkle.initialize(mode="ray", groups=[DeviceGroup(name="gpus", ranks=2, device_type="cuda")]):
        probe = DeviceProbe(remote_group="gpus")
        results = probe.probe()
    assert [r["sum"] for r in results] == [3.0, 3.0]
    assert {r["local_rank"] for r in results} == {"0", "1"}
    assert len({r["device"] for r in results}) == 2  # two different GPUs
    assert "nccl" in results[0]["backend"]
