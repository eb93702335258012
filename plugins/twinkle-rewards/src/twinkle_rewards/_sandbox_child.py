"""The child side of :func:`twinkle_rewards.sandbox.run_sandboxed`: run as a script, never imported.

``python -I -S _sandbox_child.py`` reads one JSON line of configuration on stdin, locks itself
down (see the layers in :mod:`twinkle_rewards.sandbox`), runs the untrusted solution and its
tests, and writes one result line after a random marker so the untrusted code cannot forge it
by printing. Only the standard library is used: the interpreter runs isolated (``-I -S``) and
this file is not imported as part of the package.

The result line holds ``passed``, ``error`` and ``network`` ("isolated", or why a new network
namespace could not be made); the parent logs a warning when isolation was unavailable.
"""

import importlib
import json
import os
import resource
import stat
import sys

#: Modules solutions commonly use, imported before privileges are dropped (user nobody may not
#: be able to read the standard library's directory of this interpreter).
PRELOADED = tuple(
    importlib.import_module(name)
    for name in (
        "bisect",
        "collections",
        "copy",
        "dataclasses",
        "decimal",
        "fractions",
        "functools",
        "heapq",
        "itertools",
        "math",
        "operator",
        "random",
        "re",
        "statistics",
        "string",
        "typing",
    )
)

CLONE_NEWNET = 0x40000000
NOBODY = 65534
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
BLOCKED_PREFIXES = (
    "socket.",
    "subprocess.",
    "os.exec",
    "os.spawn",
    "os.posix_spawn",
    "ctypes.",
    "os.fork",
    "os.forkpty",
    "pty.",
    "os.kill",
    "os.killpg",
    "signal.pthread_kill",
)
BLOCKED = {
    "os.system",
    "os.popen",
    "os.setuid",
    "os.chroot",
    "os.symlink",
    "os.link",
    "sys.addaudithook",
    "os.chown",
    "os.chmod",
    "os.putenv",
    "os.unsetenv",
    "_posixsubprocess.fork_exec",
}
PATH_EVENTS = {
    "os.remove",
    "os.rmdir",
    "os.mkdir",
    "os.truncate",
    "os.utime",
    "os.rename",
    "shutil.rmtree",
    "shutil.move",
    "shutil.copyfile",
    "os.listxattr",
}


def world_readable(path: str) -> bool:
    """Can user nobody import from ``path`` (every ancestor searchable by others)?"""
    path = os.path.realpath(path)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def isolate_network() -> str:
    """Move into a new, empty network namespace; ``"isolated"`` or why it was not possible."""
    if os.geteuid() != 0:
        return "not root (a network namespace needs CAP_SYS_ADMIN)"
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            return f"unshare(CLONE_NEWNET) failed: {os.strerror(errno)} (errno {errno})"
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which logs it
        return f"unshare(CLONE_NEWNET) unavailable: {type(exc).__name__}: {exc}"
    return "isolated"


def drop_privileges(tmp: str) -> None:
    """As root, become user nobody (when the standard library stays importable for it)."""
    if os.geteuid() == 0 and world_readable(os.path.dirname(os.__file__)):
        os.chown(tmp, NOBODY, NOBODY)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


def set_limits(cfg: dict) -> None:
    """Resource limits with hard = soft, so the untrusted code cannot raise them."""
    limits = [
        (resource.RLIMIT_CPU, cfg["cpu_seconds"]),
        (resource.RLIMIT_AS, cfg["memory_bytes"]),
        (resource.RLIMIT_FSIZE, cfg["file_bytes"]),
        (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_CORE, 0),
    ]
    if os.geteuid() != 0 and hasattr(resource, "RLIMIT_NPROC"):
        limits.append((resource.RLIMIT_NPROC, 0))
    for which, value in limits:
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass


def install_audit_hook(tmp: str) -> None:
    """Refuse sockets, new processes, ctypes, signals and writes outside ``tmp`` (cannot be removed)."""

    def inside(path: object) -> bool:
        if isinstance(path, int):
            return True
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        real = os.path.realpath(path)  # type: ignore[arg-type]
        return real == tmp or real.startswith(tmp + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event == "import" and args and str(args[0]).split(".")[0] in ("ctypes", "_ctypes"):
            raise PermissionError("sandbox: ctypes is not allowed")
        if event in BLOCKED or event.startswith(BLOCKED_PREFIXES):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS
            )
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory is not allowed")
        elif event in PATH_EVENTS:
            for path in args[:2]:
                if isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                    raise PermissionError(f"sandbox: {event} on {path!r} outside the sandbox directory")

    sys.addaudithook(hook)


def main() -> None:
    cfg = json.loads(sys.stdin.readline())
    marker = cfg.pop("marker")
    with open(cfg["code_path"], encoding="utf-8") as f:
        source = f.read()
    tests = cfg["tests"]
    tmp = os.path.realpath(cfg["tmp"])
    network = isolate_network()
    drop_privileges(tmp)
    set_limits(cfg)
    install_audit_hook(tmp)
    namespace = {"__name__": "__main__"}
    passed = 0
    error = None
    try:
        exec(compile(source, "solution.py", "exec"), namespace)
    except BaseException as exc:  # the solution itself failed: every test fails
        error = f"{type(exc).__name__}: {exc}"[:500]
        tests = []
    for test in tests:
        try:
            exec(compile(test, "test.py", "exec"), namespace)
            passed += 1
        except BaseException as exc:
            error = error or f"{type(exc).__name__}: {exc}"[:500]
    sys.stdout.flush()
    result = {"passed": passed, "error": error, "network": network}
    os.write(1, ("\n" + marker + json.dumps(result) + "\n").encode())


if __name__ == "__main__":
    main()
