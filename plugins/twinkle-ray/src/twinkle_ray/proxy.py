"""Driver side of ray mode: the proxy that stands in for a component whose ranks are Ray actors.

``model.forward_backward(inputs=batch)`` on a proxy reads the method's metadata
(:func:`twinkle.dispatch.remote`), sends each rank its arguments (the same arguments, or
its data rank's slice of the batch, or only rank 0), waits for every rank while watching
for errors and dead actors, and combines the results (first, mean, flatten...). The user's
loop is the same as in local mode.

``model.forward_backward.remote(inputs=batch)`` returns a :class:`RemoteResult` at once: the
result stays in Ray's object store, and passing it to another component's call hands the
object references to that component's actors, which fetch the value directly.
"""

from __future__ import annotations

import collections
import linecache
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import ray
from twinkle.dispatch import RemoteSpec, remote_methods, slice_for_data_rank
from twinkle.mesh import DeviceMesh

from twinkle_ray.errors import RayLauncherError, RemoteCallTimeout, RemoteComponentDied
from twinkle_ray.worker import RemoteArgument, combine_parts

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_CORE_COMPONENT = os.path.join("twinkle", "component.py")
_SMALL_TYPES = (type(None), bool, int, float, complex)


@dataclass(frozen=True)
class CallSettings:
    """How the driver waits for actors.

    Attributes:
        poll_s: how often a waiting call looks for failed or dead ranks.
        call_timeout_s: a call still running after this long raises :class:`RemoteCallTimeout`
            (``None``: no limit; training steps can be long).
        error_grace_s: after one rank fails, how long to wait for the others before
            deciding they are stuck in a collective and stopping the component.
        prefetch: how many items an iterator (a DataLoader in an actor) requests ahead.
    """

    poll_s: float = 1.0
    call_timeout_s: float | None = None
    error_grace_s: float = 5.0
    prefetch: int = 2


def user_call_site() -> str:
    """``file:line in function`` of the innermost frame outside twinkle-ray (the user's call)."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(_PACKAGE_DIR) and not filename.endswith(_CORE_COMPONENT):
            line = linecache.getline(filename, frame.f_lineno).strip()
            where = f"{filename}:{frame.f_lineno} in {frame.f_code.co_name}"
            return f"{where}: {line}" if line else where
        frame = frame.f_back
    return "(unknown)"


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # Python 3.10
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]


def _is_small(value: Any, depth: int = 0) -> bool:
    if isinstance(value, _SMALL_TYPES):
        return True
    if isinstance(value, str):
        return len(value) < 4096
    if isinstance(value, (list, tuple)) and depth < 2:
        return len(value) <= 16 and all(_is_small(v, depth + 1) for v in value)
    if isinstance(value, dict) and depth < 2:
        return len(value) <= 16 and all(_is_small(v, depth + 1) for v in value.values())
    return False


class RemoteComponent:
    """The actors of one component and how calls spread over them (one per proxy).

    Args:
        label: display name, e.g. ``"TransformersModel#1"``.
        cls: the component class.
        mesh: the component's DeviceMesh; actor ``r`` hosts rank ``r``.
        actors: the Ray actor handles, in rank order.
        settings: waiting and prefetch settings.
    """

    def __init__(
        self, label: str, cls: type, mesh: DeviceMesh, actors: list[Any], settings: CallSettings, pids: list[int]
    ) -> None:
        self.label = label
        self.cls = cls
        self.mesh = mesh
        self.actors = actors
        self.settings = settings
        self.pids = pids
        self.specs: dict[str, RemoteSpec] = remote_methods(cls)
        ranks = range(mesh.world_size)
        self.data_ranks = [mesh.data_rank(r) for r in ranks]
        self.leaders = sorted((r for r in ranks if mesh.is_data_leader(r)), key=self.data_ranks.__getitem__)
        self.broken: str | None = None
        self.closed = False

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteComponent, (self.label, self.cls, self.mesh, self.actors, self.settings, self.pids))

    # -- metadata ----------------------------------------------------------------
    def spec_for(self, name: str) -> RemoteSpec:
        """The method's dispatch/collect metadata; unmarked methods run on every rank and return rank 0's result."""
        spec = self.specs.get(name)
        if spec is not None:
            return spec
        if name == "__iter__":
            return RemoteSpec(name, "first", "first", iterator=True)
        if name == "__len__":
            return RemoteSpec(name, "first", "first")
        return RemoteSpec(name, "all", "first")

    def dispatch_ranks(self, spec: RemoteSpec) -> list[int]:
        return [0] if spec.dispatch == "first" else list(range(self.mesh.world_size))

    def needed_ranks(self, spec: RemoteSpec) -> list[int]:
        """The ranks whose results the collect mode combines, in order (others return ``None``)."""
        if spec.collect == "none":
            return []
        if spec.dispatch == "first" or spec.collect == "first":
            return [0]
        if spec.collect == "last_pp":
            return self.leaders[:1]
        if spec.collect == "all":
            return list(range(self.mesh.world_size))
        return list(self.leaders)

    def check_usable(self) -> None:
        if self.closed:
            raise RayLauncherError(f"{self.label}: the Ray runtime that created it was shut down; create it again")
        if self.broken is not None:
            raise RemoteComponentDied(f"{self.label} is no longer usable: {self.broken}")

    # -- arguments ---------------------------------------------------------------
    def pack_arguments(
        self, spec: RemoteSpec, ranks: list[int], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> dict[int, Any]:
        """Per-rank ``(args, kwargs)``: sliced by data rank for ``slice_dp``; RemoteResults become references."""
        plain_args = tuple(_as_argument(a) for a in args)
        plain_kwargs = {k: _as_argument(v) for k, v in kwargs.items()}
        if spec.dispatch != "slice_dp" or self.mesh.data_world_size == 1:
            packed: Any = (plain_args, plain_kwargs)
            if len(ranks) > 1 and not (_is_small(args) and _is_small(kwargs)):
                packed = ray.put(packed)  # serialize once for every rank
            return {r: packed for r in ranks}
        if args:
            batch, position = args[0], 0
        elif "inputs" in kwargs:
            batch, position = kwargs["inputs"], None
        else:
            raise TypeError(
                f"{self.cls.__name__}.{spec.name}() splits its first argument (or inputs=) over "
                f"{self.mesh.data_world_size} data-parallel ranks, but it was called without one"
            )
        per_data_rank: dict[int, Any] = {}
        result: dict[int, Any] = {}
        for rank in ranks:
            data_rank = self.data_ranks[rank]
            if data_rank not in per_data_rank:
                where = (data_rank, self.mesh.data_world_size)
                if isinstance(batch, RemoteResult):
                    part: Any = batch.as_argument(where)
                else:
                    part = slice_for_data_rank(batch, *where)
                if position == 0:
                    per_data_rank[data_rank] = ((part, *plain_args[1:]), plain_kwargs)
                else:
                    per_data_rank[data_rank] = (plain_args, {**plain_kwargs, "inputs": part})
            result[rank] = per_data_rank[data_rank]
        return result

    # -- calls -------------------------------------------------------------------
    def submit(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> RemoteResult:
        """Start ``name`` on the ranks its metadata names; returns at once."""
        self.check_usable()
        spec = self.spec_for(name)
        ranks = self.dispatch_ranks(spec)
        needed = self.needed_ranks(spec)
        packs = self.pack_arguments(spec, ranks, args, kwargs)
        wanted = set(needed)
        refs = {r: self.actors[r].call.remote(name, packs[r], r in wanted) for r in ranks}
        return RemoteResult(self, f"{name}()", spec.collect, refs, needed, user_call_site())

    def get_attribute(self, name: str) -> Any:
        """Rank 0's value of attribute ``name``."""
        self.check_usable()
        ref = self.actors[0].get_attribute.remote(name)
        return self.gather({0: ref}, f"attribute {name!r}", user_call_site())[0]

    def gather(self, refs: dict[int, Any], what: str, call_site: str, timeout: bool = True) -> dict[int, Any]:
        """Wait for every rank's reference; raise the first failure (with its rank) without hanging.

        ``timeout=False`` ignores ``call_timeout_s`` (actor start and construction, which may
        download or load a large model).

        Raises:
            The remote exception (same type, remote traceback in its message, the call site
            in a note); :class:`RemoteComponentDied` when an actor died;
            :class:`RemoteCallTimeout` past ``call_timeout_s``.
        """
        settings = self.settings
        pending = {ref: rank for rank, ref in refs.items()}
        values: dict[int, Any] = {}
        failures: dict[int, BaseException] = {}
        deadline = None
        if timeout and settings.call_timeout_s is not None:
            deadline = time.monotonic() + settings.call_timeout_s
        while pending:
            timeout = settings.poll_s
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - time.monotonic()))
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout, fetch_local=False)
            self._collect_ready(ready, pending, values, failures)
            if failures:
                self._raise_failure(failures, pending, what, call_site)
            if pending and deadline is not None and time.monotonic() >= deadline:
                stuck = sorted(pending.values())
                self.stop(f"{what} exceeded call_timeout_s={settings.call_timeout_s} (ranks {stuck} still running)")
                raise RemoteCallTimeout(
                    f"{self.label}.{what} did not finish within call_timeout_s={settings.call_timeout_s} s; ranks "
                    f"{stuck} were still running, so the component's actors were stopped (they may be deadlocked). "
                    f"If the call is just slow, raise call_timeout_s in twinkle.initialize(mode='ray', ...). "
                    f"Called from {call_site}"
                )
        return values

    @staticmethod
    def _collect_ready(
        ready: list[Any], pending: dict[Any, int], values: dict[int, Any], failures: dict[int, BaseException]
    ) -> None:
        if not ready:
            return
        try:
            fetched = ray.get(ready)
        except Exception:  # find which ranks failed
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    values[rank] = ray.get(ref)
                except Exception as exc:
                    failures[rank] = exc
            return
        for ref, value in zip(ready, fetched):
            values[pending.pop(ref)] = value

    def _raise_failure(
        self, failures: dict[int, BaseException], pending: dict[Any, int], what: str, call_site: str
    ) -> None:
        if pending:  # the others may fail too (peer gone) or be stuck in a collective
            ready, _ = ray.wait(
                list(pending), num_returns=len(pending), timeout=self.settings.error_grace_s, fetch_local=False
            )
            self._collect_ready(ready, pending, {}, failures)
        died = {r: e for r, e in failures.items() if isinstance(e, ray.exceptions.RayActorError)}
        if died:
            rank = min(died)
            detail = _first_lines(str(died[rank]), 6)
            reason = f"rank {rank} (pid {self.pids[rank]}) died during {what}"
            self.stop(reason)
            raise RemoteComponentDied(
                f"{self.label} {reason}; its other ranks were stopped and the component is unusable now. "
                f"Create it again, or end the run with twinkle.shutdown(). Called from {call_site}\n"
                f"Ray says: {detail}"
            ) from died[rank]
        rank = min(failures)
        exc = failures[rank]
        note = (
            f"twinkle-ray: raised by {self.label} rank {rank} (pid {self.pids[rank]}) in {what}, "
            f"called from {call_site}"
        )
        if pending:
            stuck = sorted(pending.values())
            self.stop(f"rank {rank} raised in {what} while ranks {stuck} stayed blocked")
            note += (
                f"; ranks {stuck} were still blocked {self.settings.error_grace_s} s later (waiting in a collective), "
                f"so the component's actors were stopped: create it again"
            )
        _add_note(exc, note)
        raise exc.with_traceback(None) from None

    # -- lifecycle ---------------------------------------------------------------
    def check_health(self, timeout_s: float = 10.0) -> dict[int, str]:
        """Ping every rank: ``{rank: 'ok' | 'busy' | 'dead: ...'}`` (busy: still running a call)."""
        refs = {rank: actor.ping.remote() for rank, actor in enumerate(self.actors)}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s, fetch_local=True)
        ready_set = set(ready)
        report: dict[int, str] = {}
        for rank, ref in refs.items():
            if ref not in ready_set:
                report[rank] = "busy"
                continue
            try:
                ray.get(ref)
                report[rank] = "ok"
            except ray.exceptions.RayActorError as exc:
                report[rank] = "dead: " + _first_lines(str(exc), 1)
        return report

    def stop(self, reason: str) -> None:
        """Kill every actor of this component (idempotent); later calls raise ``reason``."""
        if self.broken is None:
            self.broken = reason
        self._kill()

    def close(self) -> None:
        """Release the actors at runtime shutdown."""
        self.closed = True
        self._kill()

    def _kill(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass


def _first_lines(text: str, n: int) -> str:
    return "\n".join(text.strip().splitlines()[:n])


def _as_argument(value: Any) -> Any:
    return value.as_argument(None) if isinstance(value, RemoteResult) else value


class RemoteResult:
    """A call's result kept in Ray's object store (from ``proxy.method.remote(...)``).

    Pass it to another component's call and that component's actors fetch it directly,
    without a round trip through the driver; ``get()`` brings it here.

    Example::

        logps = model.forward_only.remote(inputs=batch)     # returns at once
        ref_model.forward_backward(inputs=batch, old_logps=logps)
        print(logps.get())
    """

    def __init__(
        self, remote: RemoteComponent, what: str, collect: str, refs: dict[int, Any], needed: list[int], call_site: str
    ) -> None:
        self._remote = remote
        self._what = what
        self._collect = collect
        self._refs = refs
        self._needed = needed
        self._call_site = call_site
        self._value: Any = None
        self._done = False

    @property
    def object_refs(self) -> list[Any]:
        """The Ray ObjectRefs of the ranks whose results make up the value, in collect order."""
        return [self._refs[r] for r in self._needed]

    def ready(self) -> bool:
        """True when every rank has finished (successfully or not)."""
        refs = list(self._refs.values())
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        return len(done) == len(refs)

    def get(self) -> Any:
        """Wait for every rank and return the combined value (raises the remote error, if any)."""
        if not self._done:
            values = self._remote.gather(self._refs, self._what, self._call_site)
            self._value = combine_parts(self._collect, [values[r] for r in self._needed])
            self._done = True
        return self._value

    def as_argument(self, data_slice: tuple[int, int] | None) -> RemoteArgument:
        """The placeholder sent to another component's actors."""
        return RemoteArgument(tuple(self.object_refs), self._collect, data_slice)

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError(
            "a RemoteResult is resolved when passed directly as an argument of a component call; "
            "call .get() to use its value elsewhere"
        )

    def __repr__(self) -> str:
        state = "ready" if self._done or self.ready() else "running"
        return f"<RemoteResult {self._remote.label}.{self._what} collect={self._collect!r} {state}>"


class RemoteIterator:
    """Iterates an iterator that lives in the component's actors (e.g. a DataLoader's batches).

    Requests ``prefetch`` items ahead. Yields values, or :class:`RemoteResult` objects when
    created by ``proxy.__iter__.remote()`` / ``proxy.method.remote()``.
    """

    def __init__(
        self, remote: RemoteComponent, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], keep_remote: bool
    ) -> None:
        remote.check_usable()
        self._remote = remote
        self._spec = remote.spec_for(name)
        self._what = f"{name}()"
        self._keep_remote = keep_remote
        self._call_site = user_call_site()
        self._ranks = remote.dispatch_ranks(self._spec)
        self._needed = remote.needed_ranks(self._spec)
        packs = remote.pack_arguments(self._spec, self._ranks, args, kwargs)
        starts = {r: remote.actors[r].iter_start.remote(name, packs[r]) for r in self._ranks}
        self._ids = remote.gather(starts, self._what, self._call_site)
        self._queue: collections.deque[dict[int, tuple[Any, Any]]] = collections.deque()
        self._finished = False
        self._steps = 0

    def __iter__(self) -> RemoteIterator:
        return self

    def _request(self) -> None:
        wanted = set(self._needed)
        step = {}
        for rank in self._ranks:
            method = self._remote.actors[rank].iter_next.options(num_returns=2)
            step[rank] = tuple(method.remote(self._ids[rank], rank in wanted))
        self._queue.append(step)

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        while len(self._queue) < self._remote.settings.prefetch + 1:
            self._request()
        step = self._queue.popleft()
        self._steps += 1
        what = f"{self._what} item {self._steps}"
        try:
            done = self._remote.gather({r: pair[0] for r, pair in step.items()}, what, self._call_site)
        except BaseException:
            self._finished = True
            raise
        if any(done.values()):
            self.close()
            raise StopIteration
        items = {r: pair[1] for r, pair in step.items()}
        result = RemoteResult(self._remote, what, self._spec.collect, items, self._needed, self._call_site)
        return result if self._keep_remote else result.get()

    def close(self) -> None:
        """Stop iterating and let the actors drop the iterator."""
        if self._finished:
            return
        self._finished = True
        self._queue.clear()
        remote = self._remote
        if remote.closed or remote.broken is not None:
            return
        for rank in self._ranks:
            try:
                remote.actors[rank].iter_close.remote(self._ids[rank])
            except Exception:  # the actor is gone; nothing to release
                pass

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


class RemoteMethod:
    """A component method called through the proxy.

    ``method(...)`` runs it on the ranks and returns the collected value (an iterator
    method returns a :class:`RemoteIterator`); ``method.remote(...)`` returns a
    :class:`RemoteResult` at once (or a :class:`RemoteIterator` of them).
    """

    def __init__(self, remote: RemoteComponent, name: str) -> None:
        self._remote = remote
        self._name = name
        self.__doc__ = getattr(getattr(remote.cls, name, None), "__doc__", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._remote.spec_for(self._name).iterator:
            return RemoteIterator(self._remote, self._name, args, kwargs, keep_remote=False)
        return self._remote.submit(self._name, args, kwargs).get()

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Start the call and return a :class:`RemoteResult` (or a :class:`RemoteIterator`) at once."""
        if self._remote.spec_for(self._name).iterator:
            return RemoteIterator(self._remote, self._name, args, kwargs, keep_remote=True)
        return self._remote.submit(self._name, args, kwargs)

    def __repr__(self) -> str:
        return f"<remote method {self._remote.label}.{self._name}>"


class _RemoteDunder:
    """A special method (``__iter__``, ``__len__``) looked up on the proxy class, forwarded to the actors."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, proxy: ComponentProxy | None, owner: type) -> Any:
        if proxy is None:
            return self
        remote: RemoteComponent = object.__getattribute__(proxy, "_twinkle_remote")
        if not hasattr(remote.cls, self.name):
            kind = "iterable" if self.name == "__iter__" else "sized"
            raise _Unsupported(f"'{remote.cls.__name__}' object is not {kind}")
        return RemoteMethod(remote, self.name)


class _Unsupported(TypeError, AttributeError):
    """A special method the component class lacks: ``hasattr`` is False, ``iter``/``len`` raise TypeError."""


class ComponentProxy:
    """Stands in for a component whose ranks are Ray actors; same methods, same results.

    Methods marked with :func:`twinkle.dispatch.remote` dispatch and collect per their
    metadata; other public methods run on every rank and return rank 0's result; other
    public attributes are read from rank 0. ``twinkle_ray.remote_component(proxy)`` gives
    the actors, mesh and health check.

    Example::

        model = TransformersModel(model_id=path, remote_group="default")   # a ComponentProxy
        model.forward_backward(inputs=batch)                                # runs on every rank
    """

    __iter__ = _RemoteDunder("__iter__")
    __len__ = _RemoteDunder("__len__")

    def __init__(self, remote: RemoteComponent) -> None:
        object.__setattr__(self, "_twinkle_remote", remote)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        remote: RemoteComponent = object.__getattribute__(self, "_twinkle_remote")
        attr = getattr(remote.cls, name, None)
        if name in remote.specs or (callable(attr) and not isinstance(attr, type)):
            return RemoteMethod(remote, name)
        return remote.get_attribute(name)

    def __setattr__(self, name: str, value: Any) -> None:
        remote: RemoteComponent = object.__getattribute__(self, "_twinkle_remote")
        raise AttributeError(
            f"cannot set {name!r} on {remote.label}: it lives in Ray actors; change it through one of its methods"
        )

    def __bool__(self) -> bool:
        return True

    def __reduce__(self) -> tuple[Any, ...]:
        return (ComponentProxy, (object.__getattribute__(self, "_twinkle_remote"),))

    def __repr__(self) -> str:
        remote: RemoteComponent = object.__getattribute__(self, "_twinkle_remote")
        return f"<{remote.label} on {remote.mesh.world_size} Ray actor(s), {remote.mesh.describe()}>"

    def __dir__(self) -> list[str]:
        remote: RemoteComponent = object.__getattribute__(self, "_twinkle_remote")
        return sorted(n for n in dir(remote.cls) if not n.startswith("_"))


def remote_component(proxy: Any) -> RemoteComponent:
    """The :class:`RemoteComponent` behind a proxy (actors, mesh, ``check_health()``).

    Raises:
        TypeError: ``proxy`` is not a ray-mode component.
    """
    if not isinstance(proxy, ComponentProxy):
        raise TypeError(f"{proxy!r} is not a component running in Ray actors (was it created with remote_group=?)")
    return object.__getattribute__(proxy, "_twinkle_remote")
