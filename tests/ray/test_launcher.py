"""The ray launcher with small real components: placement, dp=2 DDP over gloo, dispatch/collect,
results kept remote, iterators in actors, errors, dead actors, timeouts and shutdown."""

from __future__ import annotations

import time

import pytest
import twinkle
from ray_test_components import BrokenInit, Sleeper, TinyLoader, TinyRegressor, make_rows
from twinkle import DeviceGroup, DeviceMesh, MeshError

CPU2 = [DeviceGroup(name="default", ranks=2, device_type="cpu")]


def local_training(rows, batch_size, steps):
    with twinkle.initialize(mode="local", seed=7):
        model = TinyRegressor()
        losses = []
        for step in range(steps):
            losses.append(model.forward_backward(rows[step * batch_size : (step + 1) * batch_size]))
            model.step()
        return losses, model.weights()


@pytest.fixture(scope="module")
def dp2(ray_cluster):
    """A dp=2 TinyRegressor on two CPU actors (shared by the tests that do not break it)."""
    runtime = twinkle.initialize(mode="ray", groups=CPU2, global_device_mesh=DeviceMesh.from_sizes(dp_size=2), seed=7)
    model = TinyRegressor(remote_group="default")
    yield runtime, model
    runtime.shutdown()


def test_dp2_actors_get_torchrun_environment_and_gloo(dp2):
    _, model = dp2
    envs = model.environment()
    assert [e["RANK"] for e in envs] == ["0", "1"]
    assert {e["WORLD_SIZE"] for e in envs} == {"2"}
    assert sorted(e["LOCAL_RANK"] for e in envs) == ["0", "1"]
    assert len({e["MASTER_PORT"] for e in envs}) == 1
    assert len({e["pid"] for e in envs}) == 2  # two processes
    assert {e["dist_world_size"] for e in envs} == {2}
    assert {e["dist_backend"] for e in envs} == {"gloo"}
    assert model.all_reduce_rank() == [3.0, 3.0]  # 1 + 2 summed over the process group


def test_dp2_training_matches_local_mode(dp2):
    """Same seed, same global batch: DDP over two actors gives the local losses and weights."""
    _, model = dp2
    rows = make_rows(24)
    expected_losses, expected_weights = local_training(rows, batch_size=8, steps=3)
    before = model.weights()
    assert before[0] == pytest.approx(before[1])  # both ranks start from the seeded weights
    losses = []
    for step in range(3):
        losses.append(model.forward_backward(inputs=rows[step * 8 : (step + 1) * 8]))
        model.step()
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    weights = model.weights()
    assert weights[0] == pytest.approx(weights[1], rel=1e-6)  # ranks stay in sync
    assert weights[0] == pytest.approx(expected_weights, rel=1e-5)
    assert losses[-1] < losses[0]


def test_slice_dp_and_flatten_keep_row_order(dp2):
    _, model = dp2
    assert model.echo(list(range(6))) == list(range(6))
    with pytest.raises(ValueError, match="does not split evenly"):
        model.echo([1, 2, 3])
    with pytest.raises(TypeError, match="called without one"):
        model.echo()


def test_unmarked_method_and_proxy_surface(dp2):
    _, model = dp2
    assert model.weight_count() == 5
    assert "TinyRegressor" in repr(model) and "dp=2" in repr(model)
    with pytest.raises(AttributeError, match="lives in Ray actors"):
        model.lr = 3
    assert bool(model)
    with pytest.raises(TypeError, match="not iterable"):
        iter(model)
    assert not hasattr(model, "__len__")  # TinyRegressor has no __len__, so neither has its proxy


def test_remote_result_passes_between_components_without_the_driver(dp2, ray_cluster):
    """A batch produced by a loader actor goes to the model actors as an object reference."""
    runtime, model = dp2
    rows = make_rows(8)
    loader = TinyLoader(rows, batch_size=4, remote_group="default", device_mesh=DeviceMesh())
    refs = list(loader.__iter__.remote())
    assert len(refs) == 2 and all(isinstance(r, twinkle_ray_types().RemoteResult) for r in refs)
    echoed = model.echo.remote(refs[0])  # the model's actors fetch the batch from the loader's actor
    assert echoed.get() == rows[:4]
    chained = model.echo(echoed)  # and a model result goes back into a model call
    assert chained == rows[:4]
    assert refs[1].get() == rows[4:]


def twinkle_ray_types():
    import twinkle_ray

    return twinkle_ray


def test_dataloader_actor_plain_for_loop(ray_runtime):
    ray_runtime(groups=[DeviceGroup(name="data", ranks=1, device_type="cpu")])
    rows = list(range(10))
    loader = TinyLoader(rows, batch_size=4, remote_group="data")
    import os

    assert loader.where() != os.getpid()  # it lives in an actor
    assert len(loader) == 3
    assert [batch for batch in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    iterator = iter(loader)
    assert next(iterator) == [0, 1, 2, 3]
    iterator.close()  # stopping early, then iterating again, starts a fresh iterator
    assert list(loader) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert loader.batch_size == 4  # a plain attribute is read from the actor


def test_error_raised_in_driver_with_remote_traceback_and_call_site(dp2):
    _, model = dp2
    with pytest.raises(ValueError, match="bad batch on rank") as info:
        model.fail()  # every rank raises
    text = str(info.value)
    assert "ray_test_components.py" in text and "in fail" in text  # the remote traceback
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "TinyRegressor" in notes and "rank 0" in notes
    assert "test_launcher.py" in notes and "model.fail()" in notes  # the user's call site
    assert model.weight_count() == 5  # still usable: every rank finished


def test_constructor_error_reaches_driver(ray_runtime):
    ray_runtime(groups=[DeviceGroup(name="default", ranks=1, device_type="cpu")])
    with pytest.raises(ValueError, match="missing 'hidden_size'") as info:
        BrokenInit(remote_group="default")
    assert "construction" in "\n".join(info.value.__notes__)


def test_dead_actor_is_reported_not_hung(ray_runtime):
    import twinkle_ray

    ray_runtime(groups=CPU2)
    sleepers = Sleeper(remote_group="default")
    health = twinkle_ray.remote_component(sleepers).check_health()
    assert health == {0: "ok", 1: "ok"}
    start = time.monotonic()
    with pytest.raises(twinkle_ray.RemoteComponentDied, match="rank 1 .* died during fail") as info:
        sleepers.fail(on_rank=1, how="exit")  # rank 0 stays busy for 120 s
    assert time.monotonic() - start < 30
    assert "test_launcher.py" in str(info.value)
    with pytest.raises(twinkle_ray.RemoteComponentDied, match="no longer usable"):
        sleepers.nap(0)
    assert twinkle_ray.remote_component(sleepers).check_health()[1].startswith("dead")


def test_call_timeout(ray_runtime):
    import twinkle_ray

    ray_runtime(groups=[DeviceGroup(name="default", ranks=1, device_type="cpu")], call_timeout_s=1.0)
    sleeper = Sleeper(remote_group="default")
    assert sleeper.nap(0.01) == 0.01
    with pytest.raises(twinkle_ray.RemoteCallTimeout, match="call_timeout_s=1.0"):
        sleeper.nap(60)


def test_two_groups_on_disjoint_bundles_and_shutdown_releases(ray_cluster):
    import twinkle_ray
    from ray.util import placement_group_table

    ray = ray_cluster
    runtime = twinkle.initialize(
        mode="ray",
        groups=[
            DeviceGroup(name="model", ranks=2, device_type="cpu"),
            DeviceGroup(name="sampler", ranks=1, device_type="cpu"),
        ],
    )
    pgs = dict(runtime.launcher.placement_groups)
    assert set(pgs) == {"model", "sampler"}
    tables = {name: placement_group_table(pg) for name, pg in pgs.items()}
    assert {t["state"] for t in tables.values()} == {"CREATED"}
    assert [len(t["bundles"]) for t in (tables["model"], tables["sampler"])] == [2, 1]
    a = Sleeper(remote_group="model")
    b = Sleeper(remote_group="sampler")
    actors = twinkle_ray.remote_component(a).actors + twinkle_ray.remote_component(b).actors
    assert len(actors) == 3
    assert len(set(ray.get([actor.ping.remote() for actor in actors]))) == 3  # three processes
    runtime.shutdown()
    assert {placement_group_table(pg)["state"] for pg in pgs.values()} == {"REMOVED"}
    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.ping.remote(), timeout=30)
    with pytest.raises(twinkle_ray.RayLauncherError, match="shut down"):
        a.nap(0)
    runtime.shutdown()  # idempotent


def test_bad_groups_fail_with_a_fix(ray_cluster):
    import twinkle_ray

    with pytest.raises(twinkle_ray.PlacementError, match="GPU.*device_type='cpu'"):
        twinkle.initialize(mode="ray", groups=[DeviceGroup(name="g", ranks=1, device_type="cuda")])
    with pytest.raises(twinkle_ray.PlacementError, match="more CPUs"):
        twinkle.initialize(mode="ray", groups=[DeviceGroup(name="big", ranks=64, device_type="cpu")])
    with twinkle.initialize(mode="ray", groups=CPU2):
        with pytest.raises(MeshError, match="no DeviceGroup has that name"):
            Sleeper(remote_group="nope")
        with pytest.raises(MeshError, match="needs 4 ranks"):
            Sleeper(remote_group="default", device_mesh=DeviceMesh.from_sizes(dp_size=4))


def test_components_without_remote_group_stay_in_the_driver(ray_runtime):
    import os

    ray_runtime(groups=CPU2)
    loader = TinyLoader([1, 2, 3], batch_size=2)
    assert isinstance(loader, TinyLoader) and loader.pid == os.getpid()


def test_error_on_one_rank_while_peer_blocks_in_gloo_does_not_hang(dp2):
    """Rank 1 raises while rank 0 waits in a real gloo barrier; this stops dp2, so it runs last."""
    import twinkle_ray

    _, model = dp2
    start = time.monotonic()
    with pytest.raises(ValueError, match="bad batch on rank 1") as info:
        model.fail(on_rank=1)
    assert time.monotonic() - start < 30
    assert "were still blocked" in "\n".join(info.value.__notes__)
    with pytest.raises(twinkle_ray.RemoteComponentDied, match="no longer usable"):
        model.weight_count()
