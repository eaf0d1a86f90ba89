"""Shared fixtures: model folders, and the daemon as a real process.

Every daemon test starts `python3 -m hailo_devmgr` on the simulated backend
with its socket in a temporary folder, exactly as `make run` does, and
always stops it (SIGTERM, then SIGKILL) when the test ends.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

SRC = str(Path(__file__).resolve().parents[1] / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)
START_TIMEOUT_S = 20

# A CLIP text encoder as the simulated backend reads it: token embeddings in.
CLIP_TEXT_NET = {
    "inputs": [{"name": "text_tokens", "shape": [77, 512], "format": "FLOAT32"}],
    "outputs": [{"name": "text_embedding", "shape": [512], "format": "FLOAT32"}],
}
TWO_INPUT_NET = {
    "inputs": [{"name": "a", "shape": [4, 4, 3], "format": "UINT8"},
               {"name": "b", "shape": [8], "format": "FLOAT32"}],
    "outputs": [{"name": "sum", "shape": [8], "format": "FLOAT32"},
                {"name": "map", "shape": [4, 4], "format": "UINT8"}],
}


def die_with_parent() -> None:
    """In the child: get SIGTERM when pytest dies, so no daemon outlives a killed run.

    Linux sends it when the *thread* that started the child exits: start
    daemons from the test's own thread, not from a short-lived helper thread."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def env_with_src(extra: dict | None = None) -> dict:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HAILO_DEVICE_", "LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


@pytest.fixture(scope="session")
def readable_src() -> str:
    """A copy of ``src/`` that any uid can import, for code run as another user.

    The checkout may live where only its owner can read (a root user's
    checkout under /root, mode 0700), so another uid must not import from it."""
    folder = Path(tempfile.mkdtemp(prefix="hailo-devmgr-src-", dir="/tmp"))
    shutil.copytree(SRC, folder / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield str(folder / "src")
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "net.hef").write_text("binary HEF stand-in: default network\n")
    (folder / "other.hef").write_text("another default network\n")
    (folder / "vlm.hef").write_text("VLM stand-in\n")
    (folder / "clip_text.hef").write_text(yaml.safe_dump(CLIP_TEXT_NET))
    (folder / "two.hef").write_text(yaml.safe_dump(TWO_INPUT_NET))
    (folder / "empty.hef").write_bytes(b"")
    (folder / "subdir").mkdir()
    secret = tmp_path / "outside" / "secret.hef"
    secret.parent.mkdir()
    secret.write_text("not for socket users")
    (folder / "escape.hef").symlink_to(secret)
    return folder


def write_config(tmp_path: Path, model_dir: Path, **overrides) -> Path:
    config = {
        "backend": "simulated",
        "socket_path": str(tmp_path / "sock" / "device.sock"),
        "model_dirs": [str(model_dir)],
        "log_level": "debug",
        "simulated": {"load_ms": 5, "infer_ms": 1, "lock_path": str(tmp_path / "device.lock")},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_for_socket(path: str, process: subprocess.Popen | None = None, timeout: float = START_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"daemon exited with {process.returncode}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(path)
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"no daemon on {path} after {timeout} s")


class DaemonProcess:
    """A running daemon; ``socket_path``, ``log()``, ``stop()``."""

    def __init__(self, tmp_path: Path, config_path: Path, socket_path: str, env: dict | None = None,
                 argv_prefix: list[str] | None = None, preexec=die_with_parent):
        self.socket_path = socket_path
        self.log_path = tmp_path / f"daemon-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        argv = [*(argv_prefix or []), sys.executable, "-m", "hailo_devmgr", "--config", str(config_path)]
        self.process = subprocess.Popen(argv, env=env_with_src(env), stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, preexec_fn=preexec)

    def wait_ready(self) -> "DaemonProcess":
        try:
            wait_for_socket(self.socket_path, self.process)
        except Exception:
            self.stop()
            raise RuntimeError(f"daemon did not start:\n{self.log()}")
        return self

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture
def start_daemon(tmp_path, model_dir):
    """Factory: start_daemon(**config_overrides) → a ready DaemonProcess."""
    started = []

    def start(env: dict | None = None, preexec=die_with_parent, **overrides) -> DaemonProcess:
        config_path = write_config(tmp_path, model_dir, **overrides)
        socket_path = yaml.safe_load(config_path.read_text())["socket_path"]
        daemon = DaemonProcess(tmp_path, config_path, socket_path, env, preexec=preexec)
        started.append(daemon)
        return daemon.wait_ready()

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def daemon(start_daemon):
    return start_daemon()


@pytest.fixture
def client(daemon):
    from hailo_devmgr.client import Client
    with Client(daemon.socket_path, timeout=30) as connection:
        yield connection


@pytest.fixture(scope="session")
def debs(tmp_path_factory):
    """The packages built from this tree (once per test session)."""
    from packages import ROOT, build
    return build(ROOT, tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="session")
def older_debs(tmp_path_factory):
    """The same tree built as an older version, to upgrade from."""
    from packages import build_older
    return build_older(tmp_path_factory.mktemp("old-tree"), tmp_path_factory.mktemp("old-deb"))
