"""The twinkle-server plugin: adds ``twinkle serve`` to the ``twinkle`` command line.

Registers no components: the service hosts core's ``TransformersModel`` and friends, and
the http client mode (``twinkle.initialize(mode="http")``) stays in core.
"""

from __future__ import annotations

import twinkle


@twinkle.hookimpl
def twinkle_register_commands(register):
    register(
        "serve",
        "twinkle_server.cli:add_serve_arguments",
        help="run the multi-tenant LoRA training server (Tinker API + twinkle http mode)",
    )
