"""The ``twinkle`` command line.

``twinkle plugins [--json]``   plugins, versions, hooks, components and load errors.
``twinkle plugins --check``    import every registered component; exit 1 if any is broken.
``twinkle plot RUN_DIR...``    loss, lr, reward and throughput curves (PNG, or ``--text``).
``twinkle export ...``         merge a LoRA into its base and save a Hugging Face checkpoint.
Plugins add subcommands through the ``twinkle_register_commands`` hook (``twinkle serve``
comes from the twinkle-server plugin); see :mod:`twinkle.commands`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence


def _plugins(args: argparse.Namespace) -> int:
    from twinkle.plugins import PluginSystem

    if args.check:
        return _check(PluginSystem().load(), args.json)
    report = PluginSystem().load().report()
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for plugin in report["plugins"]:
        where = plugin["distribution"] or plugin["module"]
        version = plugin["version"] or "-"
        blocked = f"blocked by {plugin['blocked_by']}" if plugin.get("blocked_by") else "blocked"
        state = blocked if plugin["blocked"] else ("FAILED" if plugin["error"] else "ok")
        print(f"{plugin['name']}  ({where} {version}, {plugin['source']})  [{state}]")
        if plugin["hooks"]:
            print(f"  hooks: {', '.join(plugin['hooks'])}")
        by_kind: dict[str, list[str]] = {}
        for component in plugin["components"]:
            by_kind.setdefault(component["kind"], []).append(component["name"])
        for kind, names in by_kind.items():
            print(f"  {kind}: {', '.join(sorted(names))}")
        for hook, error in (plugin.get("hook_errors") or {}).items():
            print(f"  {hook} raised: {error}")
        if plugin["error"]:
            print("  error:")
            for line in plugin["error"].rstrip().splitlines():
                print(f"    {line}")
    return 0


def _check(system, as_json: bool) -> int:  # noqa: ANN001 - a PluginSystem
    result = system.check()
    if as_json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        counts = ", ".join(f"{len(result[k])} {k}" for k in ("ok", "unavailable", "broken"))
        print(f"checked {sum(len(v) for v in result.values())} components and plugins: {counts}")
        for entry in result["unavailable"]:
            print(f"  unavailable  {entry['kind']} {entry['name']!r} ({entry['plugin']}): {entry['error']}")
        for entry in result["broken"]:
            what = f"{entry['kind']} {entry['name']!r}" if entry["kind"] else "plugin"
            print(f"  BROKEN  {what} ({entry['plugin']}, {entry['target']}): {entry['error']}")
    return 1 if result["broken"] else 0


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser with core's and the plugins' commands (the one named in ``argv`` configured)."""
    return _build(list(argv))[0]


def _build(argv: list[str]) -> tuple[argparse.ArgumentParser, Callable[[], int] | None]:
    from twinkle import __version__
    from twinkle.commands import add_commands

    parser = argparse.ArgumentParser(prog="twinkle", description="Twinkle: train large language models your way.")
    parser.add_argument("--version", action="version", version=f"twinkle {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("plugins", help="list plugins, their hooks, components and load errors")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--check", action="store_true", help="import every registered component; exit 1 if any is broken")
    p.set_defaults(func=_plugins)
    failure = add_commands(sub, argv)
    return parser, failure


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, failure = _build(argv)
    if failure is not None:  # a plugin command that is not installed or does not load
        return failure()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
