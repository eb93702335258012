"""DataLoader: global batches, min_batch_size, per-data-rank slices, seeded shuffling, exact resume, retries."""

from __future__ import annotations

import logging

import pytest
from twinkle.dataloader import DataLoader
from twinkle.dataloader.sampler import RowLoadError
from twinkle.mesh import DeviceMesh


class Rows:
    """A map-style data set of numbered rows; some indices fail to load."""

    def __init__(self, n: int, broken: set[int] = frozenset()) -> None:
        self.n = n
        self.broken = broken

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if index in self.broken:
            raise OSError(f"row {index} is corrupt")
        return {"id": index, "input_ids": [index], "labels": [index], "length": 1}


def ids(batches):
    return [[row["id"] for row in batch] for batch in batches]


def test_len_and_min_batch_size():
    assert len(DataLoader(Rows(20), batch_size=8)) == 3
    assert ids(DataLoader(Rows(20), batch_size=8))[-1] == [16, 17, 18, 19]
    assert len(DataLoader(Rows(20), batch_size=8, min_batch_size=8)) == 2
    assert len(DataLoader(Rows(20), batch_size=8, min_batch_size=4)) == 3
    assert len(DataLoader(Rows(20), batch_size=8, drop_last=True)) == 2
    assert [len(b) for b in DataLoader(Rows(20), batch_size=8, min_batch_size=8)] == [8, 8]
    with pytest.raises(ValueError, match="min_batch_size=9"):
        DataLoader(Rows(20), batch_size=8, min_batch_size=9)
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(Rows(20), batch_size=0)


def test_each_data_rank_gets_its_contiguous_slice(monkeypatch):
    mesh = DeviceMesh.from_sizes(dp_size=2, fsdp_size=2, tp_size=2)  # 8 ranks, 4 data ranks
    per_rank = {}
    for rank in range(8):
        monkeypatch.setenv("RANK", str(rank))
        loader = DataLoader(Rows(36), batch_size=8, device_mesh=mesh, shuffle=True, seed=3)
        per_rank[rank] = ids(loader)
        assert len(loader) == 5
    whole = ids(DataLoader(Rows(36), batch_size=8, shuffle=True, seed=3))
    for step, batch in enumerate(whole):
        slices = [per_rank[mesh.rank_of(dp=d // 2, fsdp=d % 2)][step] for d in range(4)]
        assert sum(slices, []) == batch  # data ranks in order rebuild the global batch
        per = len(batch) // 4
        assert slices[1] == batch[per : 2 * per]
    for rank in range(8):  # tensor-parallel peers see the same rows
        assert per_rank[rank] == per_rank[rank ^ 1]
    assert [len(b) for b in per_rank[0]] == [2, 2, 2, 2, 1]  # the tail of 4 rows splits 1 per data rank
    with pytest.raises(ValueError, match="does not split over 4"):
        DataLoader(Rows(36), batch_size=6, device_mesh=mesh)


def test_the_runtime_global_mesh_is_the_default(monkeypatch):
    import twinkle

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node 2 sets it
    with twinkle.initialize(mode="local", global_device_mesh=DeviceMesh.from_sizes(dp_size=2), seed=7):
        loader = DataLoader(Rows(8), batch_size=4, shuffle=True)
        assert (loader.data_rank, loader.data_world_size, loader.seed) == (1, 2, 7)
        assert [len(b) for b in loader] == [2, 2]


def test_torchrun_without_a_mesh_splits_data_like_the_model(monkeypatch):
    """Under torchrun with no mesh anywhere, the model defaults to dp over all ranks; so does the loader."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        loader = DataLoader(Rows(8), batch_size=4, shuffle=True)  # no seed: ranks must still agree
        assert (loader.data_rank, loader.data_world_size) == (rank, 2)
        per_rank.append(ids(loader))
    assert all(len(b) == 2 for b in per_rank[0] + per_rank[1])
    assert sorted(sum(per_rank[0] + per_rank[1], [])) == list(range(8)), "the ranks' slices cover every row once"


def test_shuffle_is_deterministic_per_seed_and_changes_per_epoch():
    a = DataLoader(Rows(50), batch_size=10, shuffle=True, seed=1)
    b = DataLoader(Rows(50), batch_size=10, shuffle=True, seed=1)
    c = DataLoader(Rows(50), batch_size=10, shuffle=True, seed=2)
    epoch0 = ids(a)
    assert epoch0 == ids(b) and epoch0 != ids(c)
    assert sorted(sum(epoch0, [])) == list(range(50))
    epoch1 = ids(a)
    assert epoch1 != epoch0 and sorted(sum(epoch1, [])) == list(range(50))
    assert ids(DataLoader(Rows(5), batch_size=5)) == [[0, 1, 2, 3, 4]]


def test_exact_resume_mid_epoch_and_across_epochs():
    reference = DataLoader(Rows(30), batch_size=4, shuffle=True, seed=11)
    expected = ids(reference) + ids(reference)  # two epochs
    loader = DataLoader(Rows(30), batch_size=4, shuffle=True, seed=11)
    seen = ids(loader)  # epoch 0
    it = iter(loader)
    seen += ids([next(it), next(it), next(it)])
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["consumed_samples"] == 12 and state["seed"] == 11
    resumed = DataLoader(Rows(30), batch_size=4, shuffle=True, seed=999)  # the state's seed wins
    resumed.load_state_dict(state)
    seen += ids(resumed)
    assert seen == expected
    with pytest.raises(ValueError, match="batch_size=4"):
        DataLoader(Rows(30), batch_size=8).load_state_dict(state)


def test_rows_that_fail_to_load_are_replaced_counted_and_bounded(caplog):
    loader = DataLoader(Rows(10, broken={2, 5}), batch_size=5)
    with caplog.at_level(logging.WARNING, logger="twinkle.dataloader"):
        batches = ids(loader)
    assert batches == [[0, 1, 3, 3, 4], [5 + 1, 6, 7, 8, 9]]
    assert loader.skipped_rows == 2 and loader.state_dict()["skipped_rows"] == 2
    assert "row 2 failed to load (OSError: row 2 is corrupt)" in caplog.text
    with pytest.raises(RowLoadError, match="4 consecutive rows failed"):
        list(DataLoader(Rows(10, broken={0, 1, 2, 3}), batch_size=5, max_retries=3))


def test_over_an_encoded_dataset(seed_dataset):
    loader = DataLoader(dataset=seed_dataset, batch_size=16, shuffle=True, seed=0)
    batch = next(iter(loader))
    assert len(batch) == 16 and {"input_ids", "labels", "length", "messages"} <= set(batch[0])
