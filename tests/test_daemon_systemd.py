"""What systemd sees: socket hand-over, sd_notify, watchdog, signals, config errors."""
from __future__ import annotations

import io
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml

from conftest import DaemonProcess, die_with_parent, env_with_src, wait_for_socket, write_config
from hailo_devmgr.wire import protocol as p
from hailo_devmgr.daemon import systemd
from hailo_devmgr.client import Client, DeviceError, tensor


class NotifyListener:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.daemons: list = []   # started against this listener; stopped by the fixture
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def lines(self) -> list[str]:
        return [line for _, line in self.messages]

    def wait_for(self, prefix: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                if line.startswith(prefix):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no {prefix} among {self.lines()}")

    def count(self, line: str, since: float = 0.0, until: float = float("inf")) -> int:
        return sum(1 for at, text in self.messages if text == line and since <= at <= until)

    def close(self):
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    yield listener
    for daemon in listener.daemons:  # whatever the test did, no daemon outlives it
        daemon.stop()
    listener.close()


def start_notified(tmp_path, model_dir, notify, watchdog_usec=200_000, **overrides) -> DaemonProcess:
    config = write_config(tmp_path, model_dir, **overrides)
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(watchdog_usec)}
    daemon = DaemonProcess(tmp_path, config, yaml.safe_load(config.read_text())["socket_path"], env)
    notify.daemons.append(daemon)
    return daemon.wait_ready()


def test_socket_activation_hands_over_the_listening_fd(tmp_path, model_dir):
    activate = shutil.which("systemd-socket-activate")
    assert activate, "systemd-socket-activate (package systemd) is needed; make test installs it"
    socket_path = str(tmp_path / "activated.sock")
    config = write_config(tmp_path, model_dir, socket_path="/nonexistent/never-bound.sock")
    log = open(tmp_path / "activate.log", "wb")
    process = subprocess.Popen(
        [activate, "-l", socket_path, "-E", "PYTHONPATH", sys.executable, "-m", "hailo_devmgr",
         "--config", str(config)],
        env=env_with_src(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for_socket(socket_path, process)
        # The daemon starts on the first connection, as under the .socket unit.
        with Client(socket_path, timeout=30) as client:
            assert client.ping()["status"] == "ok"
            assert client.load_model(str(model_dir / "net.hef"), "generic")["status"] == "ok"
        assert not os.path.exists("/nonexistent/never-bound.sock")
        assert "using the socket passed by systemd" in (tmp_path / "activate.log").read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        log.close()


def test_socket_activated_with_broken_config_answers_waiting_clients_then_exits_1(tmp_path):
    """... until the file changes (at most 10 s): no client gets an error the admin fixed."""
    socket_path = str(tmp_path / "activated.sock")
    config = tmp_path / "bad.yaml"
    config.write_text("max_loaded_models: lots\n")
    process = subprocess.Popen(
        [shutil.which("systemd-socket-activate"), "-l", socket_path, "-E", "PYTHONPATH", sys.executable,
         "-m", "hailo_devmgr", "--config", str(config)],
        env=env_with_src(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(socket_path, process)
        with pytest.raises(DeviceError) as info:   # the first answer (hello's) carries it
            with Client(socket_path, timeout=30) as client:
                client.request("status")
        # The client gets the reason instead of waiting on a queued connection
        # (which would make systemd restart us until the socket unit fails).
        assert info.value.code == p.DEVICE_UNAVAILABLE
        assert "configuration error" in info.value.message and "max_loaded_models" in info.value.message
        config.write_text("max_loaded_models: 2\n")
        assert process.wait(5) == 1  # well before the 10 s it answers an unchanged file
        assert "max_loaded_models: must be an integer, got 'lots'" in process.stderr.read()
    finally:
        process.kill()
        process.wait()


def test_notify_ready_status_watchdog_and_stopping(tmp_path, model_dir, notify):
    daemon = start_notified(tmp_path, model_dir, notify)
    ready_at = None
    notify.wait_for("READY=1")
    assert notify.wait_for("STATUS=").startswith("STATUS=simulated backend, 0 model(s) loaded")
    with Client(daemon.socket_path, timeout=30) as client:
        client.load_model(str(model_dir / "net.hef"), "generic")
    notify.wait_for("STATUS=simulated backend, 1 model(s) loaded")
    ready_at = notify.messages[0][0]
    time.sleep(0.6)
    assert notify.count("WATCHDOG=1", since=ready_at) >= 3  # every 0.1 s for WATCHDOG_USEC=0.2 s
    daemon.signal(signal.SIGTERM)
    assert daemon.process.wait(15) == 0
    notify.wait_for("STOPPING=1")
    assert notify.lines().index("READY=1") < notify.lines().index("STOPPING=1")


def test_watchdog_pings_stop_while_a_device_call_hangs(tmp_path, model_dir, notify):
    daemon = start_notified(tmp_path, model_dir, notify,
                            watchdog={"load_budget_s": 0.5, "infer_budget_s": 0.5})
    notify.wait_for("WATCHDOG=1")
    path = str(model_dir / "net.hef")
    with Client(daemon.socket_path, timeout=30) as client:
        client.load_model(path, "generic")
        hung = Client(daemon.socket_path, timeout=30).connect()
        hung._sock.sendall(p.encode_frame({
            "action": "infer", "model_type": "generic", "model_path": path,
            "model_params": {"simulate_hang_ms": 3000},
            "input_data": {"inputs": {"input_layer1": tensor(np.zeros((224, 224, 3), np.uint8))}}}))
        started = time.monotonic()
        time.sleep(2.0)
        # Budget 1 s (load + infer): from then until the hang ends, no pings.
        silent = notify.count("WATCHDOG=1", since=started + 1.3, until=started + 2.0)
        # The control plane still answers: only the device is stuck.
        assert client.status()["device_busy_with"].startswith("infer")
        hung.close()
    assert silent == 0
    time.sleep(1.5)  # the hang ends at 3 s; pings resume
    assert notify.count("WATCHDOG=1", since=started + 3.2) >= 1
    assert "withholding watchdog pings" in daemon.log()


def test_sigterm_answers_queued_work_and_exits_zero(tmp_path, model_dir, notify):
    daemon = start_notified(tmp_path, model_dir, notify)
    path = str(model_dir / "net.hef")
    with Client(daemon.socket_path, timeout=30) as client:
        client.load_model(path, "generic")
    frame = {"action": "infer", "model_type": "generic", "model_path": path,
             "input_data": {"inputs": {"input_layer1": tensor(np.zeros((224, 224, 3), np.uint8))}}}
    running = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    running.connect(daemon.socket_path)
    running.sendall(p.encode_frame({**frame, "request_id": "running", "model_params": {"simulate_ms": 1500}}))
    time.sleep(0.3)
    queued = []
    for index in range(5):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(daemon.socket_path)
        sock.sendall(p.encode_frame({**frame, "request_id": f"queued-{index}"}))
        queued.append(sock)
    time.sleep(0.3)
    daemon.signal(signal.SIGTERM)
    from test_daemon_v1 import read_frame
    for sock in [running, *queued]:
        sock.settimeout(15)
    answers = {answer["request_id"]: answer for answer in (read_frame(s) for s in [running, *queued])}
    assert answers["running"]["status"] == "ok"  # the running operation finishes
    for index in range(5):
        assert answers[f"queued-{index}"]["code"] == p.SHUTTING_DOWN
    assert daemon.process.wait(15) == 0
    notify.wait_for("STOPPING=1")
    assert not os.path.exists(daemon.socket_path)  # a socket we bound ourselves is removed
    for sock in [running, *queued]:
        sock.close()


def test_config_error_exits_1_with_one_line(tmp_path, model_dir):
    config = tmp_path / "bad.yaml"
    config.write_text("backend: simulated\nsimulated:\n  infer_ms: fast\n")
    result = subprocess.run([sys.executable, "-m", "hailo_devmgr", "--config", str(config)],
                            env=env_with_src(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"hailo-device-manager: configuration error: {config}: simulated.infer_ms: "
        "must be an integer, got 'fast'"]


def test_sighup_reloads_and_keeps_connections(tmp_path, model_dir, notify):
    daemon = start_notified(tmp_path, model_dir, notify, max_loaded_models=4)
    a, b = str(model_dir / "net.hef"), str(model_dir / "other.hef")
    with Client(daemon.socket_path, timeout=30) as client:
        client.load_model(a, "generic")
        client.load_model(b, "generic")
        # With a change that needs a restart: it waits, the rest applies.
        write_config(tmp_path, model_dir, max_loaded_models=1, scheduling={"max_queue": 7},
                     simulated={"infer_ms": 3})
        daemon.signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        deadline = time.monotonic() + 10
        while "configuration reloaded" not in daemon.log():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client.load_model(str(model_dir / "two.hef"), "generic")  # same connection still works
        assert len(client.status()["loaded_models"]) == 1  # the new limit applies
        assert client.request("hello", protocol=1)["limits"]["max_queue"] == 7
        assert "simulated change only after a restart" in daemon.log()
        # A broken file on reload keeps the running configuration.
        (tmp_path / "config.yaml").write_text("backend: [")
        daemon.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload failed, keeping the running configuration" not in daemon.log():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.ping()["status"] == "ok"


def test_reload_helper_checks_the_file_before_it_signals(tmp_path, model_dir, notify):
    """ExecReload=hailo-device-manager --reload $MAINPID: a bad file fails the reload
    (exit 1, the line at fault) and the daemon is not even signalled."""
    daemon = start_notified(tmp_path, model_dir, notify, max_loaded_models=4)
    config = tmp_path / "config.yaml"

    def reload():
        return subprocess.run([sys.executable, "-m", "hailo_devmgr", "--config", str(config), "--reload",
                               str(daemon.process.pid)], env=env_with_src(), capture_output=True, text=True,
                              timeout=30)
    write_config(tmp_path, model_dir, max_loaded_models=2)
    good = reload()
    assert good.returncode == 0 and "reloads it" in good.stdout
    notify.wait_for("RELOADING=1")
    config.write_text(config.read_text() + "max_loaded_models: lots\n")
    bad = reload()
    assert bad.returncode == 1
    assert bad.stderr.strip().endswith("max_loaded_models: must be an integer, got 'lots'")
    time.sleep(0.3)
    assert "reload failed" not in daemon.log()  # never signalled: nothing to keep
    with Client(daemon.socket_path, timeout=30) as client:
        assert client.ping()["status"] == "ok"


def test_log_lines_carry_structured_fields(client, daemon, model_dir):
    path = str(model_dir / "net.hef")
    client.load_model(path, "generic")
    from hailo_devmgr.client import DeviceError
    with pytest.raises(DeviceError):
        client.load_model("/etc/passwd", "generic")
    log = daemon.log()
    [loaded] = [line for line in log.splitlines() if "loaded generic:" in line]
    for field in (f"MODEL={path}", "MODEL_TYPE=generic", "REQUEST_ID=1", f"CLIENT_PID={os.getpid()}",
                  f"CLIENT_UID={os.getuid()}", "DURATION_MS="):
        assert field in loaded
    assert any("CODE=forbidden" in line for line in log.splitlines())
    assert "ping" not in log  # no line per control request


def test_unit_files_follow_the_design():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "systemd"
    service = (root / "hailo-device-manager.service").read_text()
    sock = (root / "hailo-device-manager.socket").read_text()
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30", "Restart=on-failure",
                 "User=hailo-device-mgr", "SupplementaryGroups=hailo", "MemoryMax=2G", "CPUQuota=200%",
                 "ProtectSystem=strict", "DevicePolicy=closed", "NoNewPrivileges=yes"):
        assert f"\n{line}\n" in service, line
    assert "\nRuntimeDirectory=hailo\n" not in service  # would delete /run/hailo and the socket
    # Its own folder, kept across restarts: a loan of the device survives them.
    assert "\nRuntimeDirectory=hailo-device-manager\n" in service and "\nRuntimeDirectoryPreserve=yes\n" in service
    for line in ("ListenStream=/run/hailo/device.sock", "SocketMode=0660", "SocketGroup=hailo",
                 "DirectoryMode=0755"):
        assert f"\n{line}\n" in sock, line
    example = (root / "examples" / "hailo-clip-search.service").read_text()
    assert "Requires=hailo-device-manager.socket" in example
    assert "After=hailo-device-manager.socket" in example


# A client's text as it may reach STATUS=: not latin-1 (sdnotify's encoding),
# a lone surrogate (not UTF-8 either), assignments after newlines, and long.
HOSTILE_TEXT = "last error: Model path /srv/€\udcff\nREADY=1\nMAINPID=1\n" + "x" * 100_000


def test_notifications_go_out_whatever_text_they_carry(notify):
    notifier = systemd.Notifier({"NOTIFY_SOCKET": notify.path})
    notifier.status(HOSTILE_TEXT)
    notifier.reloading()
    notifier.ready(HOSTILE_TEXT)
    deadline = time.monotonic() + 5
    while len(notify.lines()) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    status, reloading, reloading_status, ready, ready_status = notify.lines()
    assert (reloading, reloading_status, ready) == ("RELOADING=1", "STATUS=Reloading configuration", "READY=1")
    assert status == ready_status and status.startswith("STATUS=last error: Model path /srv/€\\udcff\\nREADY=1")
    assert len(status) < systemd.MAX_STATUS_CHARS + 50


def test_notifications_to_a_vanished_socket_are_logged_once(tmp_path, caplog):
    notifier = systemd.Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with caplog.at_level(logging.WARNING, logger="hailo_devmgr.daemon.systemd"):
        for _ in range(3):
            notifier.watchdog()
    assert [record.message for record in caplog.records] == [
        f"cannot notify systemd at {tmp_path / 'gone.sock'}: [Errno 2] No such file or directory"]


def test_log_records_are_bounded_and_on_one_line():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(systemd.PlainFormatter("%(levelname)s %(message)s"))
    handler.addFilter(systemd.BoundedRecords())
    logger = logging.Logger("bounded")
    logger.addHandler(handler)
    huge = "A" * (60 * 1024 * 1024)
    logger.warning("%s refused: %s", "forged\nINFO a line of the client's", huge, extra={"REQUEST_ID": huge})
    try:
        raise ValueError(huge)
    except ValueError:
        logger.exception("failed on %r", huge)
    first, *traceback = out.getvalue().splitlines()
    assert first.startswith("WARNING forged\\nINFO a line of the client's refused: AAAA")
    assert len(first) < systemd.MAX_LOG_CHARS + systemd.MAX_LOG_FIELD_CHARS + 200
    assert len(out.getvalue()) < 8 * systemd.MAX_LOG_CHARS


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(start_daemon):
    """systemd's soft limit of 1024 is for select() users; we use epoll."""
    def unit_limit():
        die_with_parent()
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    daemon = start_daemon(preexec=unit_limit)
    soft, hard = resource.prlimit(daemon.process.pid, resource.RLIMIT_NOFILE)
    assert soft == hard > 1024 or hard <= 1024


def test_lines_about_one_client_uid_are_rate_limited_and_the_drop_is_told():
    import logging
    from hailo_devmgr.daemon.systemd import PerClientRate
    now = [0.0]
    limit = PerClientRate(rate=20, burst=200, clock=lambda: now[0])

    def record(uid):
        line = logging.LogRecord("x", logging.INFO, __file__, 1, "refused: %s", ("bad",), None)
        if uid is not None:
            line.CLIENT_UID = uid
        return line
    assert sum(limit.filter(record(1000)) for _ in range(1000)) == 200
    assert all(limit.filter(record(None)) for _ in range(1000))   # the daemon's own lines
    assert limit.filter(record(1001))                              # another uid keeps its own budget
    now[0] = 1.0
    passed = [line for line in (record(1000) for _ in range(100)) if limit.filter(line)]
    assert len(passed) == 20
    assert "800 earlier line(s) about uid 1000 not logged" in passed[0].getMessage()
