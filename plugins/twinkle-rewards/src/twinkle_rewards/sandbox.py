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
  write anything the caller owns. When the namespace cannot be made (not root, or a container
  without ``CAP_SYS_ADMIN``) a warning is logged once per reason (logger
  ``twinkle_rewards.sandbox``) and :attr:`SandboxResult.network` says why; sockets are still
  refused by the audit hook below;
* a :func:`sys.addaudithook` hook (cannot be removed from Python code) that refuses
  sockets, process creation (fork, exec, spawn, subprocess, system), ``ctypes`` (which
  could call libc directly), writes/renames/deletes/links outside the temp directory and
  signals to other processes;
* a wall-clock timeout in the parent that kills the child's whole process group.

The child is :mod:`twinkle_rewards._sandbox_child`, run as a script with ``python -I -S``.

This protects the caller's machine and files; it is not a defence against a policy
that learns to fake the harness's result line by introspection.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

#: The child program (a module of this package, run as a script by the sandboxed interpreter).
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")

logger = logging.getLogger(__name__)
_warned_network: set[str] = set()


@dataclass
class SandboxResult:
    """Outcome of one sandboxed run.

    Attributes:
        passed: tests that passed.
        total: tests run.
        timed_out: the wall-clock limit killed it.
        error: the first exception, or why the run produced no result.
        stdout: the child's output (truncated), without the result line.
        network: ``"isolated"`` (a new, empty network namespace), or why it was not possible.
    """

    passed: int
    total: int
    timed_out: bool = False
    error: str | None = None
    stdout: str = ""
    network: str | None = None


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
        os.chmod(tmp, 0o755)
        os.chmod(code_path, 0o644)
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
                [python or sys.executable, "-I", "-S", CHILD],
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
        network = result.get("network")
        _warn_network(network)
        return SandboxResult(int(result["passed"]), len(tests), timed_out, result.get("error"), head[-2000:], network)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _warn_network(network: str | None) -> None:
    if network in (None, "isolated") or network in _warned_network:
        return
    _warned_network.add(network)
    logger.warning(
        "twinkle-rewards sandbox: network-namespace isolation is unavailable (%s); untrusted code still cannot "
        "open sockets (the audit hook refuses them), but it runs on the host's network stack. Run as root (or "
        "with CAP_SYS_ADMIN) for a namespace without network.",
        network,
    )


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
