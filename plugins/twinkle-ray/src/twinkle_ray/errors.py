"""Errors the Ray launcher raises in the driver."""

from __future__ import annotations


class RayLauncherError(RuntimeError):
    """Base of the Ray launcher's own errors (remote exceptions keep their own type)."""


class RemoteComponentDied(RayLauncherError):
    """An actor of a component died (its process exited, was killed or ran out of memory).

    The component is unusable afterwards: its other ranks may be blocked in a collective,
    so the launcher kills them. Create the component again, or shut the runtime down.
    """


class RemoteCallTimeout(RayLauncherError):
    """A call did not finish within the launcher's ``call_timeout_s``."""


class PlacementError(RayLauncherError):
    """The cluster cannot hold the DeviceGroups (not enough CPUs/GPUs, or placement timed out)."""
