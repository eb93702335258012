"""Entry point of twinkle-megatron: registers its components with Twinkle (lazy targets, nothing heavy imported)."""

from __future__ import annotations

import twinkle


@twinkle.hookimpl
def twinkle_register_components(register) -> None:  # noqa: ANN001
    register("model", "MegatronModel", "twinkle_megatron.model:MegatronModel", doc="megatron-core backend")
