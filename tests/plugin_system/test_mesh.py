"""DeviceGroup and DeviceMesh: validation, rank queries."""

from __future__ import annotations

import pytest
from twinkle import DeviceGroup, DeviceMesh, MeshError


def test_group_ranks_from_count_and_list():
    assert DeviceGroup("g", ranks=3, device_type="cpu").ranks == (0, 1, 2)
    assert DeviceGroup("g", ranks=[4, 5], device_type="cuda").world_size == 2


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "", "ranks": 1}, "non-empty"),
        ({"name": "g", "ranks": 0}, "at least one"),
        ({"name": "g", "ranks": [1, 1]}, "repeat"),
        ({"name": "g", "ranks": [-1]}, "non-negative"),
        ({"name": "g", "ranks": 1, "device_type": "tpu"}, "device_type='tpu'"),
    ],
)
def test_group_validation(kwargs, fragment):
    with pytest.raises(MeshError, match=fragment):
        DeviceGroup(**kwargs)


def test_from_sizes_world_and_data_sizes():
    mesh = DeviceMesh.from_sizes(pp_size=2, tp_size=2, dp_size=2)
    assert mesh.world_size == 8
    assert mesh.data_world_size == 2
    mesh = DeviceMesh.from_sizes(fsdp_size=4, dp_size=2)
    assert (mesh.world_size, mesh.data_world_size) == (8, 8)


def test_dp_inferred_from_world_size():
    assert DeviceMesh.from_sizes(tp_size=2, world_size=8).dp == 4


def test_sizes_that_do_not_multiply_to_world_size():
    with pytest.raises(MeshError, match="uses 4 ranks but world_size=8"):
        DeviceMesh.from_sizes(dp_size=2, tp_size=2, world_size=8)
    with pytest.raises(MeshError, match="not divisible"):
        DeviceMesh.from_sizes(tp_size=3, world_size=8)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_dim_sizes(bad):
    with pytest.raises(MeshError, match="tp_size must be a positive integer"):
        DeviceMesh.from_sizes(tp_size=bad)


def test_ep_must_divide_data_ranks():
    assert DeviceMesh.from_sizes(dp_size=4, ep_size=2).ep == 2
    with pytest.raises(MeshError, match="ep_size=3 must divide"):
        DeviceMesh.from_sizes(dp_size=4, ep_size=3)


def test_layout_tp_fastest_and_data_ranks():
    mesh = DeviceMesh.from_sizes(pp_size=2, dp_size=2, tp_size=2)
    assert mesh.coordinates(0) == {"pp": 0, "dp": 0, "fsdp": 0, "cp": 0, "sp": 0, "tp": 0}
    assert mesh.coordinates(1)["tp"] == 1
    assert mesh.coordinates(2)["dp"] == 1
    assert mesh.coordinates(4)["pp"] == 1
    # tensor/pipeline peers consume the same data slice
    assert [mesh.data_rank(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert mesh.group_ranks("tp", 2) == [2, 3]
    assert mesh.group_ranks("pp", 1) == [1, 5]
    assert [r for r in range(8) if mesh.is_data_leader(r)] == [4, 6]
    for rank in range(8):
        assert mesh.rank_of(**mesh.coordinates(rank)) == rank


def test_rank_out_of_range():
    with pytest.raises(MeshError, match="outside"):
        DeviceMesh.from_sizes(dp_size=2).coordinates(2)
