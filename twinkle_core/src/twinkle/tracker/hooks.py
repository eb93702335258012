"""Core's lifecycle hooks that feed the trackers (registered with core's built-ins)."""

from __future__ import annotations

from typing import Any, Mapping

from twinkle.hookspecs import hookimpl


@hookimpl
def twinkle_metrics_emitted(runtime: Any, source: str, step: int | None, metrics: Mapping[str, Any]) -> None:
    from twinkle.tracker.runs import feed

    feed(runtime, source, step, metrics)


@hookimpl
def twinkle_runtime_stopped(runtime: Any) -> None:
    from twinkle.tracker.runs import close

    close(runtime)
