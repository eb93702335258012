"""``mode='ray'``: DeviceGroups become placement groups, components become actors behind a proxy.

``twinkle.initialize(mode='ray', groups=[DeviceGroup(...)], ...)`` connects to a Ray
cluster (``address=``) or starts a local one, and reserves one placement group per
DeviceGroup: one bundle per rank (``{"CPU": 1}`` for ``device_type='cpu'``,
``{"GPU": gpus_per_worker, "CPU": 1}`` for ``'cuda'``). Placement groups reserve disjoint
resources, so a model group and a sampler group never share a device.

A component created with ``remote_group='name'`` becomes one actor per rank of its
DeviceMesh (``device_mesh=``, else the runtime's ``global_device_mesh``, else
``dp = group size``), each on its rank's bundle, with the torchrun environment set before
the component is constructed and ``torch.distributed`` initialized among them (gloo on
CPU, nccl on GPU) unless the component did it itself. The caller gets a
:class:`~twinkle_ray.proxy.ComponentProxy`. Components created without ``remote_group``
are built in the driver, as in local mode.

Example::

    twinkle.initialize(mode="ray", groups=[DeviceGroup(name="default", ranks=2, device_type="cpu")],
                       global_device_mesh=DeviceMesh.from_sizes(dp_size=2), seed=42)
    model = TransformersModel(model_id=path, remote_group="default")   # two actors, gloo DDP
"""

from __future__ import annotations

import itertools
import os
import uuid
from typing import Any

from twinkle.launcher.base import Launcher
from twinkle.mesh import DeviceGroup, DeviceMesh, MeshError

from twinkle_ray.errors import PlacementError
from twinkle_ray.proxy import CallSettings, ComponentProxy, RemoteComponent

#: Share of a bundle each actor requests, so several components can share one DeviceGroup.
ACTOR_SHARE = 0.01
_BACKENDS = {"cpu": "gloo", "cuda": "cpu:gloo,cuda:nccl", "npu": "hccl"}
_ACCELERATOR = {"cuda": "GPU", "npu": "NPU"}


class RayLauncher(Launcher):
    """Runs components with ``remote_group=`` as Ray actors on placement groups.

    Args:
        runtime: the runtime being initialized.
        address: a running cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``);
            ``None`` starts a local cluster unless Ray is already initialized in this process.
        num_cpus: logical CPUs of a local cluster (default: enough for every CPU rank).
        num_gpus: GPUs of a local cluster (default: Ray detects them).
        namespace: the Ray namespace.
        runtime_env: Ray runtime environment for the job.
        call_timeout_s: a call still running after this long raises ``RemoteCallTimeout``
            (default: none).
        error_grace_s: after one rank fails, how long the others get before the
            component is stopped as stuck.
        placement_timeout_s: how long to wait for placement groups to be reserved.
        poll_s: how often a waiting call checks for failed or dead ranks.
        prefetch: items an actor-side iterator requests ahead.
        dist_timeout_s: timeout of the process groups the launcher initializes.
        ray_init_options: more keyword arguments for ``ray.init``.

    Raises:
        PlacementError: (at start) the cluster cannot hold the DeviceGroups.
    """

    mode = "ray"

    def __init__(
        self,
        runtime: Any,
        address: str | None = None,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        namespace: str | None = None,
        runtime_env: dict[str, Any] | None = None,
        call_timeout_s: float | None = None,
        error_grace_s: float = 5.0,
        placement_timeout_s: float = 120.0,
        poll_s: float = 1.0,
        prefetch: int = 2,
        dist_timeout_s: float = 1800.0,
        ray_init_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            runtime,
            address=address,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            namespace=namespace,
            runtime_env=runtime_env,
            call_timeout_s=call_timeout_s,
            error_grace_s=error_grace_s,
            placement_timeout_s=placement_timeout_s,
            poll_s=poll_s,
            prefetch=prefetch,
            dist_timeout_s=dist_timeout_s,
            ray_init_options=ray_init_options,
        )
        if prefetch < 0:
            raise ValueError(f"prefetch={prefetch} must be >= 0")
        self.settings = CallSettings(
            poll_s=poll_s, call_timeout_s=call_timeout_s, error_grace_s=error_grace_s, prefetch=prefetch
        )
        self.placement_groups: dict[str, Any] = {}
        self.components: list[RemoteComponent] = []
        self._owns_ray = False
        self._counter = itertools.count(1)
        self._run_id = uuid.uuid4().hex[:8]

    # -- start ---------------------------------------------------------------------
    def start(self) -> None:
        """Connect to (or start) Ray and reserve one placement group per DeviceGroup."""
        import ray

        options = self.options
        if not ray.is_initialized():
            init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
            if options["address"] is None:
                init["num_cpus"] = options["num_cpus"] or max(os.cpu_count() or 1, self._cpus_needed())
                if options["num_gpus"] is not None:
                    init["num_gpus"] = options["num_gpus"]
            else:
                init["address"] = options["address"]
            if options["namespace"] is not None:
                init["namespace"] = options["namespace"]
            if options["runtime_env"] is not None:
                init["runtime_env"] = options["runtime_env"]
            init.update(options["ray_init_options"] or {})
            _init_ray(init, retries=2 if options["address"] is None else 0)
            self._owns_ray = True
        try:
            self._check_resources()
            for group in self.runtime.groups.values():
                self.placement_groups[group.name] = self._reserve(group)
        except BaseException:
            self.shutdown()
            raise

    def _cpus_needed(self) -> float:
        return sum(self._bundle(g).get("CPU", 0) * g.world_size for g in self.runtime.groups.values())

    @staticmethod
    def _bundle(group: DeviceGroup) -> dict[str, float]:
        bundle: dict[str, float] = {"CPU": float(group.options.get("num_cpus", 1))}
        accelerator = _ACCELERATOR.get(group.device_type)
        if accelerator is not None:
            bundle[accelerator] = float(group.gpus_per_worker)
        bundle.update(group.options.get("resources", {}))
        return bundle

    def _check_resources(self) -> None:
        import ray

        total = ray.cluster_resources()
        needed: dict[str, float] = {}
        for group in self.runtime.groups.values():
            for key, amount in self._bundle(group).items():
                needed[key] = needed.get(key, 0.0) + amount * group.world_size
        for key, amount in needed.items():
            have = total.get(key, 0.0)
            if amount > have:
                wanted = ", ".join(
                    f"{g.name!r}: {g.world_size} x {self._bundle(g)}" for g in self.runtime.groups.values()
                )
                hint = (
                    "use device_type='cpu' for CPU actors, or connect to a cluster that has them with address="
                    if key in ("GPU", "NPU")
                    else "start the cluster with more CPUs (initialize(mode='ray', num_cpus=...), or `ray start "
                    "--num-cpus`), or lower DeviceGroup(options={'num_cpus': ...})"
                )
                raise PlacementError(
                    f"the DeviceGroups need {amount:g} {key} in all ({wanted}) but the Ray cluster has {have:g}; {hint}"
                )

    def _reserve(self, group: DeviceGroup) -> Any:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        strategy = group.options.get("placement_strategy", "PACK")
        bundles = [self._bundle(group)] * group.world_size
        pg = placement_group(bundles, strategy=strategy, name=f"twinkle-{group.name}-{self._run_id}")
        ready, _ = ray.wait([pg.ready()], timeout=self.options["placement_timeout_s"])
        if not ready:
            remove_placement_group(pg)
            raise PlacementError(
                f"DeviceGroup {group.name!r}: Ray could not reserve {group.world_size} x {self._bundle(group)} "
                f"(strategy {strategy}) within placement_timeout_s={self.options['placement_timeout_s']} s; other "
                f"jobs may hold the resources (`ray status` shows them), or no node is large enough"
            )
        return pg

    # -- create --------------------------------------------------------------------
    def mesh_for(self, cls: type, group: DeviceGroup, kwargs: dict[str, Any]) -> DeviceMesh:
        """The component's mesh: ``device_mesh=``, else the global mesh, else ``dp = group size``."""
        mesh = kwargs.get("device_mesh") or self.runtime.global_device_mesh
        if mesh is None:
            mesh = DeviceMesh.from_sizes(dp_size=group.world_size)
        if not isinstance(mesh, DeviceMesh):
            raise MeshError(f"{cls.__name__}(device_mesh=...) must be a twinkle DeviceMesh, got {type(mesh).__name__}")
        if mesh.world_size > group.world_size:
            raise MeshError(
                f"{cls.__name__}: {mesh.describe()} needs {mesh.world_size} ranks but DeviceGroup {group.name!r} has "
                f"{group.world_size}; give the group ranks={mesh.world_size} or use a smaller mesh"
            )
        return mesh

    def create(self, cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ComponentProxy | None:
        """Start one actor per mesh rank on the group's bundles and construct the component in them.

        Returns ``None`` (build here) when ``remote_group`` is not given.

        Raises:
            MeshError: unknown group, or a mesh larger than the group.
            The component's own exception when its construction fails in an actor.
        """
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from twinkle_ray.worker import RankWorker

        group_name = kwargs.get("remote_group")
        if group_name is None:
            return None
        if group_name not in self.runtime.groups:
            raise MeshError(
                f"{cls.__name__}(remote_group={group_name!r}): no DeviceGroup has that name; declared groups: "
                f"{', '.join(self.runtime.groups) or '(none): pass groups=[DeviceGroup(...)] to twinkle.initialize'}"
            )
        group = self.runtime.groups[group_name]
        mesh = self.mesh_for(cls, group, kwargs)
        label = f"{cls.__name__}#{next(self._counter)}"
        accelerator = _ACCELERATOR.get(group.device_type)
        resources: dict[str, Any] = {"num_cpus": ACTOR_SHARE}
        if accelerator == "GPU":
            resources["num_gpus"] = ACTOR_SHARE if group.gpus_per_worker == 1 else group.gpus_per_worker
        elif accelerator is not None:
            share = ACTOR_SHARE if group.gpus_per_worker == 1 else group.gpus_per_worker
            resources["resources"] = {accelerator: share}
        worker_cls = ray.remote(RankWorker)
        pg = self.placement_groups[group_name]
        actors = [
            worker_cls.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
                max_restarts=0,
                **resources,
            ).remote(label, r)
            for r in range(mesh.world_size)
        ]
        remote = RemoteComponent(label, cls, mesh, actors, self.settings, pids=[0] * mesh.world_size)
        self.components.append(remote)
        call_site = _call_site()
        try:
            placements = remote.gather(
                {r: a.placement.remote() for r, a in enumerate(actors)}, "actor start", call_site, timeout=False
            )
            remote.pids[:] = [placements[r]["pid"] for r in range(mesh.world_size)]
            port = remote.gather({0: actors[0].free_port.remote()}, "actor start", call_site, timeout=False)[0]
            envs = self._environments(group, mesh, [placements[r] for r in range(mesh.world_size)], port)
            runtime_spec = {
                "groups": list(self.runtime.groups.values()),
                "mesh": mesh,
                "seed": self.runtime.seed,
                "nproc_per_node": self.runtime.nproc_per_node,
            }
            backend = group.options.get("dist_backend", _BACKENDS[group.device_type])
            packed: Any = remote.pack_arguments(remote.spec_for("__init__"), [0], args, kwargs)[0]
            if mesh.world_size > 1:
                packed = ray.put(packed)  # serialize the arguments once for every rank
            builds = {
                r: actors[r].build.remote(
                    envs[r], cls, packed, runtime_spec, backend, float(self.options["dist_timeout_s"])
                )
                for r in range(mesh.world_size)
            }
            remote.gather(builds, f"{cls.__name__}(...) construction", call_site, timeout=False)
        except BaseException:
            remote.stop("its construction failed")
            raise
        return ComponentProxy(remote)

    @staticmethod
    def _environments(
        group: DeviceGroup, mesh: DeviceMesh, placements: list[dict[str, Any]], port: int
    ) -> list[dict[str, str]]:
        """The torchrun environment of each rank (RANK, LOCAL_RANK, MASTER_ADDR/PORT, devices)."""
        world = mesh.world_size
        by_node: dict[str, list[int]] = {}
        for rank, placement in enumerate(placements):
            by_node.setdefault(placement["node_id"], []).append(rank)
        node_order = list(by_node)
        envs = []
        for rank, placement in enumerate(placements):
            peers = by_node[placement["node_id"]]
            env = {
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(peers.index(rank)),
                "LOCAL_WORLD_SIZE": str(len(peers)),
                "GROUP_RANK": str(node_order.index(placement["node_id"])),
                "NODE_RANK": str(node_order.index(placement["node_id"])),
                "MASTER_ADDR": placements[0]["node_ip"],
                "MASTER_PORT": str(port),
                "TWINKLE_RAY_GROUP": group.name,
            }
            if group.device_type == "cuda" and group.gpus_per_worker == 1:
                # Like torchrun: every rank on a node sees the node's devices of this component, and
                # LOCAL_RANK indexes them, so torch.cuda.set_device(LOCAL_RANK) picks the right one.
                node_gpus: list[str] = []
                for peer in peers:
                    for gpu in placements[peer]["gpu_ids"]:
                        if gpu not in node_gpus:
                            node_gpus.append(gpu)
                own = placement["gpu_ids"][0] if placement["gpu_ids"] else None
                if own is not None:
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpus)
                    env["LOCAL_RANK"] = str(node_gpus.index(own))
            envs.append(env)
        return envs

    # -- shutdown ------------------------------------------------------------------
    def shutdown(self) -> None:
        """Kill every actor, remove the placement groups, and stop Ray if this launcher started it."""
        try:
            import ray
            from ray.util.placement_group import remove_placement_group
        except ImportError:  # pragma: no cover - ray is a dependency
            return
        for component in self.components:
            component.close()
        self.components.clear()
        if ray.is_initialized():
            for pg in self.placement_groups.values():
                try:
                    remove_placement_group(pg)
                except Exception:  # already removed with the cluster
                    pass
        self.placement_groups.clear()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False


def _init_ray(init: dict[str, Any], retries: int) -> None:
    """``ray.init``; a local cluster is retried, since Ray gives its raylet a fixed 30 s to come up."""
    import ray

    for attempt in range(retries + 1):
        try:
            ray.init(**init)
            return
        except Exception as exc:
            ray.shutdown()
            if attempt == retries or "timed out during startup" not in str(exc):
                raise


def _call_site() -> str:
    from twinkle_ray.proxy import user_call_site

    return user_call_site()
