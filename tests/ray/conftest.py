"""Fixtures of the twinkle-ray tests: ONE local Ray cluster for the whole test session.

Starting Ray costs seconds, so the cluster is session-scoped; every test builds its own
``twinkle.initialize(mode='ray', ...)`` runtime on it (placement groups and actors are
released by ``shutdown``, the cluster stays).
"""

from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

#: Logical CPUs of the test cluster. CPU DeviceGroups reserve one per rank; the seed's
#: example uses a group of 8 ranks, so 8 (logical: this is accounting, not cores).
TEST_CLUSTER_CPUS = 8


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every test; actors import this folder's helper modules."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray starts its workers at nice 15: on a busy shared machine the actors then crawl next to
    # every other process and the tests' timeouts fire; plain priority like the driver's.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Actors unpickle the test components by module name, so they need this folder on sys.path.
    paths = [HERE, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    if ray.is_initialized():
        ray.shutdown()
    for attempt in range(3):
        try:  # Ray gives its raylet a fixed 30 s to register: a busy shared machine can miss it
            ray.init(num_cpus=TEST_CLUSTER_CPUS, include_dashboard=False, log_to_driver=True)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_runtime(ray_cluster):
    """Factory: ``ray_runtime(groups=[...], ...)`` initializes mode='ray' and shuts it down after the test."""
    import twinkle

    runtimes = []

    def make(**kwargs):
        runtime = twinkle.initialize(mode="ray", **kwargs)
        runtimes.append(runtime)
        return runtime

    yield make
    for runtime in reversed(runtimes):
        runtime.shutdown()
