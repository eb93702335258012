"""Entry point of twinkle-ray: registers its components with Twinkle (lazy targets, nothing heavy imported)."""

from __future__ import annotations

import twinkle


@twinkle.hookimpl
def twinkle_register_launchers(register) -> None:  # noqa: ANN001
    register("ray", "twinkle_ray.launcher:RayLauncher", doc="Ray actors on placement groups")
