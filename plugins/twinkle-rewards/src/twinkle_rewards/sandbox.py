"""Run untrusted Python in a subprocess that cannot hurt the caller.

Layers (each alone would be bypassable; together they cover the usual hostile snippets):

* a fresh temporary directory as cwd, ``HOME`` and ``TMPDIR``, deleted afterwards;
  the child runs ``python -I -S`` (isolated: no user site, no ``PYTHON*`` variables) with
  an empty environment;
* resource limits set in the child before the untrusted code runs (hard = soft, so the
  code cannot raise them): CPU seconds (``RLIMIT_CPU``), address space (``RLIMIT_AS``),
  file size (``RLIMIT_FSIZE``), open files, core dumps off, and, when not root, processes
  (``RLIMIT_NPROC``);
* when started as root: a new network namespace (no interfaces but a down loopback) via
  ``unshare(CLONE_NEWNET)`` and a drop to ``nobody`` (uid/gid 65534), so the code cannot
  write anything the caller owns;
* a :func:`sys.addaudithook` hook (cannot be removed from Python code) that refuses
  sockets, process creation (fork, exec, spawn, subprocess, system), ``ctypes`` (which
  could call libc directly), writes/renames/deletes/links outside the temp directory and
  signals to other processes;
* a wall-clock timeout in the parent that kills the child's whole process group.

This protects the caller's machine and files; it is not a defence against a policy
that learns to fake the harness's result line by introspection.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass

_HARNESS = r'''
import json, os, resource, sys
# Modules solutions commonly use, imported before privileges are dropped.
import bisect, collections, copy, dataclasses, decimal, fractions, functools, heapq, itertools, math  # noqa
import operator, random, re, statistics, string, typing  # noqa

def _world_readable(path):
    """Can user nobody import from ``path`` (every ancestor searchable by others)?"""
    import stat
    path = os.path.realpath(path)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent

def _setup(cfg):
    tmp = os.path.realpath(cfg["tmp"])
    if os.geteuid() == 0:
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.unshare(0x40000000)  # CLONE_NEWNET: no network at all
        except Exception:
            pass
        if _world_readable(os.path.dirname(os.__file__)):
            os.chown(tmp, 65534, 65534)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
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
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    blocked_prefixes = ("socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "ctypes.",
                        "os.fork", "os.forkpty", "pty.", "os.kill", "os.killpg", "signal.pthread_kill")
    blocked = {"os.system", "os.popen", "os.setuid", "os.chroot", "os.symlink", "os.link", "sys.addaudithook",
               "os.chown", "os.chmod", "os.putenv", "os.unsetenv", "_posixsubprocess.fork_exec"}
    path_events = {"os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.utime", "os.rename",
                   "shutil.rmtree", "shutil.move", "shutil.copyfile", "os.listxattr"}

    def inside(path):
        if isinstance(path, int):
            return True
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        real = os.path.realpath(path)
        return real == tmp or real.startswith(tmp + os.sep)

    def hook(event, args):
        if event == "import" and args and str(args[0]).split(".")[0] in ("ctypes", "_ctypes"):
            raise PermissionError("sandbox: ctypes is not allowed")
        if event in blocked or event.startswith(blocked_prefixes):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory is not allowed")
        elif event in path_events:
            for path in args[:2]:
                if isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                    raise PermissionError(f"sandbox: {event} on {path!r} outside the sandbox directory")

    sys.addaudithook(hook)

def _main():
    cfg = json.loads(sys.stdin.readline())
    marker = cfg.pop("marker")
    source = open(cfg["code_path"]).read()
    tests = cfg["tests"]
    _setup(cfg)
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
    os.write(1, ("\n" + marker + json.dumps({"passed": passed, "error": error}) + "\n").encode())

_main()
'''


@dataclass
class SandboxResult:
    """Outcome of one sandboxed run.

    Attributes:
        passed: tests that passed.
        total: tests run.
        timed_out: the wall-clock limit killed it.
        error: the first exception, or why the run produced no result.
        stdout: the child's output (truncated), without the result line.
    """

    passed: int
    total: int
    timed_out: bool = False
    error: str | None = None
    stdout: str = ""


def run_sandboxed(
    code: str,
    tests: list[str],
    *,
    timeout: float = 5.0,
    memory_mb: int = 512,
    file_mb: int = 16,
    python: str | None = None,
) -> SandboxResult:
    """Run ``code`` then each snippet of ``tests`` (e.g. ``assert f(2) == 4``) in a sandboxed subprocess.

    Args:
        code: the untrusted program.
        tests: snippets run after it in the same namespace; each counts as passed when it raises nothing.
        timeout: wall-clock seconds (CPU time is limited to the same, rounded up).
        memory_mb: address-space limit of the child.
        file_mb: largest file the child may write (inside its temp dir).
        python: the interpreter (default: this one).

    Returns:
        A :class:`SandboxResult`.

    Example::

        run_sandboxed("def sq(x):\\n    return x * x", ["assert sq(3) == 9"]).passed  # 1
    """
    marker = "@@TWINKLE-RESULT-" + secrets.token_hex(16) + "@@"
    tmp = tempfile.mkdtemp(prefix="twinkle-sandbox-")
    try:
        code_path = os.path.join(tmp, "solution.py")
        with open(code_path, "w", encoding="utf-8") as f:
            f.write(code)
        harness_path = os.path.join(tmp, "harness.py")
        with open(harness_path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(_HARNESS))
        os.chmod(tmp, 0o755)
        os.chmod(code_path, 0o644)
        os.chmod(harness_path, 0o644)
        work = os.path.join(tmp, "work")
        os.mkdir(work)
        os.chmod(work, 0o777)
        cfg = {
            "marker": marker,
            "code_path": code_path,
            "tests": list(tests),
            "tmp": work,
            "cpu_seconds": max(1, int(timeout + 0.999)),
            "memory_bytes": int(memory_mb) << 20,
            "file_bytes": int(file_mb) << 20,
        }
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        out_path = os.path.join(tmp, "stdout.txt")
        with open(out_path, "wb") as out_file:  # a file, not a pipe: output size is capped by RLIMIT_FSIZE
            proc = subprocess.Popen(
                [python or sys.executable, "-I", "-S", harness_path],
                cwd=work,
                env=env,
                stdin=subprocess.PIPE,
                stdout=out_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        timed_out = False
        try:
            proc.communicate(json.dumps(cfg).encode() + b"\n", timeout=timeout + 2.0)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            proc.wait()
        finally:
            _kill_group(proc.pid)  # anything the code left behind in its session
        with open(out_path, "rb") as f:
            f.seek(max(0, os.path.getsize(out_path) - 65536))
            text = f.read().decode("utf-8", errors="replace")
        head, sep, tail = text.rpartition(marker)
        if not sep:
            reason = "timed out" if timed_out else f"no result (exit code {proc.returncode})"
            return SandboxResult(0, len(tests), timed_out=timed_out, error=reason, stdout=text[-2000:])
        result = json.loads(tail.strip().splitlines()[0])
        return SandboxResult(int(result["passed"]), len(tests), timed_out, result.get("error"), head[-2000:])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
