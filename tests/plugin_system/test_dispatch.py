"""The remote seam: method metadata, slicing and collection."""

from __future__ import annotations

import pytest
from twinkle.dispatch import collect_results, remote, remote_methods, slice_for_data_rank


class Base:
    @remote(dispatch="all", collect="first")
    def configure(self):
        return "ok"


class Child(Base):
    @remote(dispatch="slice_dp", collect="mean")
    def forward_backward(self, inputs):
        return len(inputs)

    def helper(self):
        return None


def test_remote_methods_are_collected_through_the_mro():
    specs = remote_methods(Child)
    assert set(specs) == {"configure", "forward_backward"}
    assert specs["forward_backward"].dispatch == "slice_dp"
    assert Child().forward_backward([1, 2]) == 2  # the decorator leaves the method callable


def test_invalid_modes_are_rejected():
    with pytest.raises(ValueError, match="dispatch="):
        remote(dispatch="scatter")
    with pytest.raises(ValueError, match="collect="):
        remote(collect="sum")


def test_slices_are_contiguous_and_even():
    batch = list(range(8))
    assert [slice_for_data_rank(batch, r, 4) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="divisible by 3"):
        slice_for_data_rank(batch, 0, 3)


def test_collect_modes():
    results = [{"loss": 1.0, "name": "a"}, {"loss": 3.0, "name": "b"}, {"loss": 5.0, "name": "c"}]
    assert collect_results("mean", results, leaders=[0, 2], last_pp=[2]) == {"loss": 3.0, "name": "a"}
    assert collect_results("flatten", [[1], [2, 3]], leaders=[0, 1], last_pp=[1]) == [1, 2, 3]
    assert collect_results("last_pp", [1, 2, 3], leaders=[0], last_pp=[2]) == 3
    assert collect_results("none", [1], leaders=[0], last_pp=[0]) is None
