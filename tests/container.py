"""A throw-away Debian system booted with real systemd, for end-to-end tests.

debootstrap makes a minimal rootfs once per suite and package list (cached
under /var/cache/hailo-devmgr-e2e); each test session boots it with
``systemd-nspawn -b --volatile=overlay``, so the cache stays pristine and
every change vanishes with the container. Commands run inside through
``nsenter`` into the container's PID 1 (machinectl and systemd-run -M need
a host systemd, which these machines lack).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("HAILO_E2E_CACHE", "/var/cache/hailo-devmgr-e2e"))
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "ca-certificates")
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def unavailable_reason() -> str | None:
    """Why this machine cannot boot a container, or None when it can."""
    if os.geteuid() != 0:
        return "booting a container with systemd-nspawn needs root"
    for tool, package in (("systemd-nspawn", "systemd-container"), ("debootstrap", "debootstrap"),
                          ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt-get install {package})"
    return None


def host_mirror() -> str:
    """The Debian mirror the host's own apt uses."""
    sources = Path("/etc/apt/sources.list.d")
    texts = [path.read_text() for path in sorted(sources.glob("*.sources"))] if sources.is_dir() else []
    for text in texts:
        for stanza in text.split("\n\n"):
            if re.search(r"^Suites:.*\b(bookworm|trixie|stable)\b(?!-)", stanza, re.M):
                match = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
                if match and "security" not in match.group(1):
                    return match.group(1)
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        match = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+\s+main", legacy.read_text(), re.M)
        if match and "security" not in match.group(1):
            return match.group(1)
    return DEFAULT_MIRROR


def rootfs(suite: str, mirror: str | None = None, packages: tuple[str, ...] = BASE_PACKAGES) -> Path:
    """A cached minimal rootfs for ``suite`` with ``packages``, made on first use."""
    mirror = mirror or host_mirror()
    key = hashlib.sha256(f"{suite} {mirror} {' '.join(packages)}".encode()).hexdigest()[:12]
    target = CACHE / f"{suite}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time
        if not (target / ".complete").exists():
            shutil.rmtree(target, ignore_errors=True)
            work = Path(tempfile.mkdtemp(prefix=f"{suite}-", dir=CACHE))
            result = subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", suite,
                 str(work), mirror], capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                shutil.rmtree(work, ignore_errors=True)
                raise RuntimeError(f"debootstrap {suite} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
            (work / ".complete").touch()
            work.rename(target)
        # A root filesystem's / is 0755 (mkdtemp made it 0700, and a booted copy then
        # broke dbus for anyone but root); also mends caches made before.
        target.chmod(0o755)
    return target


def run_in(root: Path, command: str, *, binds: dict[str, str], env: dict[str, str], log_path: Path,
           timeout: float) -> int:
    """Run ``command`` with sh in a throw-away (not booted) container of ``root``.

    Like a fresh machine without PID-1 systemd (as CI's is); every change
    vanishes with it. Output goes to ``log_path``; returns the exit status."""
    argv = ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "-D", str(root),
            "--volatile=overlay", "--as-pid2"]
    argv += [f"--bind-ro={host}:{inside}" for host, inside in binds.items()]
    argv += ["env", "-i", *(f"{key}={value}" for key, value in env.items()), "sh", "-c", command]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={"PATH": CLEAN_PATH}, start_new_session=True)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
            raise


class Container:
    """A booted container; ``sh()`` runs a command inside, as root or a user."""

    def __init__(self, root: Path, binds: dict[str, str], log_path: Path):
        self.name = f"hailo-e2e-{os.getpid()}-{time.monotonic_ns() % 100000}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        argv = ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", f"--machine={self.name}",
                "-D", str(root), "-b", "--console=passive", "--volatile=overlay"]
        argv += [f"--bind-ro={host}:{inside}" for host, inside in binds.items()]
        env = {"PATH": CLEAN_PATH, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.pid = self._init_pid()
        self._wait_running()

    def _init_pid(self, timeout: float = 30) -> int:
        """The container's systemd: the nspawn process's child."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited:\n{self.log_path.read_text()}")
            try:
                children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
            except OSError:
                children = []
            if children:
                return int(children[0])
            time.sleep(0.05)
        raise TimeoutError("the container's systemd did not start")

    def _wait_running(self, timeout: float = 180) -> None:
        # is-system-running fails once or twice before the container's bus is up.
        # A trixie boot once took over 60 s on a quiet 2-CPU CI machine (its units
        # were all up a minute later): 180 s, so only a boot that hangs fails.
        deadline = time.monotonic() + timeout
        while True:
            state = self.sh("systemctl is-system-running --wait", check=False, timeout=timeout).stdout.strip()
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"container state {state!r}")
            time.sleep(0.2)

    def sh(self, command: str, *, user: str | None = None, check: bool = True,
           timeout: float = 120) -> subprocess.CompletedProcess:
        """Run ``command`` with sh inside the container (as ``user`` via runuser)."""
        inner = ["sh", "-c", command]
        if user:
            inner = ["runuser", "-u", user, "--", *inner]
        argv = ["nsenter", "-t", str(self.pid), "-a", "env", "-i", f"PATH={CLEAN_PATH}", "LANG=C.UTF-8",
                *inner]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"in container: {command!r} exited {result.returncode}\n"
                                 f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}")
        return result

    def out(self, command: str, **kwargs) -> str:
        return self.sh(command, **kwargs).stdout.strip()

    def show(self, unit: str, *props: str) -> dict[str, str]:
        text = self.out(f"systemctl show {unit} " + " ".join(f"-p {prop}" for prop in props))
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def stop(self) -> None:
        """Shut the container down (SIGTERM to nspawn is a clean poweroff)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()
