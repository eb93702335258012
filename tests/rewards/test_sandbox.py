"""The code reward's sandbox against hostile snippets: loops, fork bombs, writes outside, network."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from twinkle_rewards.rewards import CodeExecutionReward
from twinkle_rewards.sandbox import run_sandboxed


def test_runs_good_code_and_allows_its_own_temp_dir():
    code = "with open('scratch.txt', 'w') as f:\n    f.write('ok')\ndef read():\n    return open('scratch.txt').read()"
    result = run_sandboxed(code, ["assert read() == 'ok'", "import math\nassert math.isqrt(16) == 4"])
    assert (result.passed, result.total, result.error) == (2, 2, None)


def test_infinite_loop_is_killed():
    start = time.monotonic()
    result = run_sandboxed("while True:\n    pass", ["assert True"], timeout=1.0)
    assert result.passed == 0
    assert time.monotonic() - start < 10


def test_sleeping_forever_hits_the_wall_clock_limit():
    result = run_sandboxed("import time\ntime.sleep(60)", ["assert True"], timeout=1.0)
    assert result.timed_out and result.passed == 0


def test_fork_bomb_is_refused_and_leaves_no_process():
    before = _count_processes()
    result = run_sandboxed("import os\nwhile True:\n    os.fork()", ["assert True"], timeout=2.0)
    assert result.passed == 0 and "fork" in (result.error or "")
    for snippet in (
        "import subprocess\nsubprocess.run(['sleep', '30'])",
        "import os\nos.system('sleep 30 &')",
        "import ctypes\nctypes.CDLL(None).fork()",
        "import multiprocessing as m\nm.Process(target=print).start()",
    ):
        assert run_sandboxed(snippet, ["assert True"], timeout=2.0).passed == 0, snippet
    assert _count_processes() <= before + 1  # nothing left running (the +1 tolerates unrelated activity)


def test_cannot_write_or_delete_outside_its_temp_dir(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "created.txt"
    for snippet in (
        f"open({str(target)!r}, 'w').write('pwned')",
        f"import os\nos.remove({str(victim)!r})",
        f"open({str(victim)!r}, 'a').write('pwned')",
        f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
        f"import os\nos.symlink({str(victim)!r}, 'link')\nopen('link', 'w').write('pwned')",
        f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
    ):
        result = run_sandboxed(snippet, ["assert True"], timeout=3.0)
        assert result.passed == 0, snippet
        assert "sandbox" in (result.error or "") or result.error, snippet
    assert victim.read_text() == "precious"
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


def test_no_network_access():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    connections = []

    def accept():
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                conn, _ = server.accept()
                connections.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    for snippet in (
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')",
        f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
        f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
    ):
        result = run_sandboxed(snippet, ["assert True"], timeout=3.0)
        assert result.passed == 0, snippet
    thread.join()
    server.close()
    assert connections == []


def test_memory_limit():
    result = run_sandboxed("x = bytearray(4 * 1024 ** 3)", ["assert True"], memory_mb=256, timeout=5.0)
    assert result.passed == 0 and "MemoryError" in (result.error or "")


def test_hostile_completions_through_the_reward():
    reward = CodeExecutionReward(timeout=1.5)
    tests = ["assert f() == 1"]
    trajs = [
        {"messages": [{"role": "assistant", "content": code}], "user_data": {"tests": tests}}
        for code in (
            "def f():\n    return 1",
            "while True: pass",
            "import os\nwhile True: os.fork()",
            "import socket\nsocket.socket()\ndef f():\n    return 1",
        )
    ]
    assert reward(trajs) == [1.0, 0.0, 0.0, 0.0]


def _count_processes() -> int:
    """Processes whose working directory is a sandbox's (children inherit it), not every process on a busy box."""
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                count += "twinkle-sandbox-" in os.readlink(f"/proc/{name}/cwd")
            except OSError:  # gone, or not ours to read
                pass
    return count


@pytest.fixture(autouse=True)
def _no_leftover_sandbox_dirs():
    import tempfile

    def dirs():
        return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("twinkle-sandbox-")}

    before = dirs()
    yield
    assert dirs() <= before


def test_network_isolation_is_reported_and_its_absence_logged_once(caplog):
    """The child says whether it got a network namespace; the parent logs each reason it did not, once."""
    import logging

    from twinkle_rewards import sandbox

    with caplog.at_level(logging.WARNING, logger="twinkle_rewards.sandbox"):
        result = run_sandboxed("x = 1", ["assert x == 1"])
    assert result.passed == 1
    if os.geteuid() == 0:  # root (CI containers): a namespace, or the reason the kernel refused it
        assert result.network == "isolated" or result.network.startswith("unshare(CLONE_NEWNET)")
    else:
        assert result.network == "not root (a network namespace needs CAP_SYS_ADMIN)"
    if result.network != "isolated":  # warned about (in this test or earlier in the process)
        assert result.network in sandbox._warned_network
    caplog.clear()
    reason = "unshare(CLONE_NEWNET) failed: Operation not permitted (errno 1)"
    sandbox._warned_network.discard(reason)
    with caplog.at_level(logging.WARNING, logger="twinkle_rewards.sandbox"):
        sandbox._warn_network(reason)
        sandbox._warn_network(reason)  # once per reason
        sandbox._warn_network("isolated")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and reason in messages[0] and "audit hook refuses them" in messages[0]


def test_the_child_is_a_module_of_the_package():
    """The harness is a real file (linted with the repository), not a string written out at run time."""
    from twinkle_rewards import sandbox

    assert os.path.isfile(sandbox.CHILD) and sandbox.CHILD.endswith("twinkle_rewards/_sandbox_child.py")
    assert "_HARNESS" not in vars(sandbox)
