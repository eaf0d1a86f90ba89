"""The hostile-clients tier: attacks by real unprivileged uids on the real daemon.

Each attack runs as its own process under uid ``ATTACKER`` (or
``ATTACKER_2``), both in the socket's group, against a daemon started as
`make run` starts it (simulated backend) with the soft descriptor limit a
systemd unit gets (1024). The victim is the test itself (root), or another
unprivileged uid where ownership matters. Every attack is bounded in count
and time and stops by itself.
"""
from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from conftest import die_with_parent, env_with_src

ATTACKER = 65534       # nobody
ATTACKER_2 = 65533     # a second unprivileged uid (no passwd entry needed)
SOCKET_GROUP = 65532   # stands for group `hailo`: the socket is 0660 to it
SYSTEMD_SOFT_NOFILE = 1024
# A victim is "not wedged" when it is answered within this: far below its
# client's timeout, far above any machine's noise. How fast it is answered
# under attack is a figure for bench/, never a test's bound.
VICTIM_PATIENCE_S = 10.0

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="attacks run as other uids: needs root")


def _unit_fd_limit() -> None:
    die_with_parent()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (SYSTEMD_SOFT_NOFILE, hard))


@pytest.fixture
def socket_folder():
    """A socket folder the attackers can reach (pytest's tmp is root-only)."""
    folder = tempfile.mkdtemp(prefix="hailo-hostile-", dir="/tmp")
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def hostile_daemon(start_daemon, socket_folder):
    """Factory: a daemon whose socket group holds the attackers; config overrides as start_daemon."""
    def start(**overrides):
        overrides.setdefault("socket_path", f"{socket_folder}/device.sock")
        overrides.setdefault("socket_mode", "0660")
        overrides.setdefault("log_level", "info")
        daemon = start_daemon(preexec=_unit_fd_limit, **overrides)
        os.chown(daemon.socket_path, 0, SOCKET_GROUP)
        return daemon
    return start


def attacker(uid: int, readable_src: str, socket_path: str, code: str, *args: str) -> subprocess.Popen:
    """Start ``code`` as ``uid`` (in the socket's group); it sees SOCK and ARGS."""
    prologue = f"import sys; SOCK = {socket_path!r}; ARGS = sys.argv[1:]\n"
    return subprocess.Popen(
        [sys.executable, "-c", prologue + textwrap.dedent(code), *args], user=uid, group=uid,
        extra_groups=[SOCKET_GROUP], env=env_with_src({"PYTHONPATH": readable_src}), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent, cwd="/")


def wait_for_line(process: subprocess.Popen, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if text in line:
            return
        assert line or process.poll() is None, process.stderr.read()
    raise AssertionError(f"attacker never printed {text!r}")


@contextlib.contextmanager
def attacking(uid: int, readable_src: str, socket_path: str, code: str, *args: str, ready: str = "sent"):
    """An attack in the background, from the line ``ready`` it prints until the block ends (then killed)."""
    process = attacker(uid, readable_src, socket_path, code, *args)
    try:
        wait_for_line(process, ready)
        yield process
    finally:
        process.kill()
        process.communicate()


def attack(uid: int, readable_src: str, socket_path: str, code: str, *args: str, timeout: float = 120) -> str:
    """Run an attack to its end; its standard output (it must exit 0)."""
    process = attacker(uid, readable_src, socket_path, code, *args)
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    return out


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
