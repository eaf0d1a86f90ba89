"""Hostile clients, part text: what a client writes must not come back, go to
the log or reach systemd unbounded or unescaped; odd shapes are bad requests;
the simulator's test hook does not exist on a real backend."""
from __future__ import annotations

import json
import signal
import time

import pytest

from hailo_devmgr.wire import protocol as p
from hailo_devmgr.client import Client, DeviceError
from hostile import (ATTACKER, ATTACKER_2, VICTIM_PATIENCE_S, attack, attacker, hostile_daemon,  # noqa: F401
                     needs_root, socket_folder)
from test_daemon_systemd import NotifyListener

pytestmark = needs_root

# A raw v1 connection sending ARGS[1] frames whose action is ARGS[0] bytes
# long, reading every answer; prints the answers' total size.
HUGE_ACTION = """
import socket, struct
size, count = int(ARGS[0]), int(ARGS[1])
body = b'{"request_id": 1, "action": "' + b"A" * size + b'"}'
frame = struct.pack(">I", len(body)) + body

def exactly(sock, size):
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the daemon closed the connection"
        data += chunk
    return bytes(data)

total = 0
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
    sock.connect(SOCK)
    for _ in range(count):
        sock.sendall(frame)
        (length,) = struct.unpack(">I", exactly(sock, 4))
        total += len(exactly(sock, length))
print(total)
"""

# One request through the client library; prints the error code (or ok).
REQUEST = """
import json
from hailo_devmgr.client import Client, DeviceError
with Client(SOCK, timeout=30) as client:
    try:
        client.request(ARGS[0], **json.loads(ARGS[1]))
        print("ok")
    except DeviceError as error:
        print(error.code)
"""


def ping_latencies(client: Client, until=lambda: True, at_least: int = 20) -> list[float]:
    """Ping round trips (s) until ``until()`` is true, at least ``at_least`` of them."""
    latencies: list[float] = []
    while len(latencies) < at_least or not until():
        started = time.monotonic()
        client.ping()
        latencies.append(time.monotonic() - started)
        time.sleep(0.01)
    return latencies


def test_huge_action_names_are_neither_echoed_nor_logged_and_slow_no_one(hostile_daemon, readable_src):
    daemon = hostile_daemon()
    # Two uids with two connections each, inside every per-uid byte budget.
    size, frames, uids = 28 * 1024 * 1024, 3, (ATTACKER, ATTACKER_2, ATTACKER, ATTACKER_2)
    with Client(daemon.socket_path, timeout=30) as victim:
        log_before = daemon.log_path.stat().st_size
        started = [attacker(uid, readable_src, daemon.socket_path, HUGE_ACTION, str(size), str(frames))
                   for uid in uids]
        during = ping_latencies(victim, lambda: all(process.poll() is not None for process in started))
    answered = [process.communicate(timeout=30) for process in started]
    assert all(process.returncode == 0 for process in started), answered
    requests = frames * len(uids)
    answer_bytes = sum(int(out) for out, _ in answered)
    log_bytes = daemon.log_path.stat().st_size - log_before
    assert answer_bytes < 1024 * requests, answer_bytes
    assert log_bytes < 2048 * requests, log_bytes
    # Not wedged: every ping answered meanwhile (how fast: bench/, not a test bound).
    assert len(during) >= 20 and max(during) < VICTIM_PATIENCE_S, max(during)


def test_client_text_in_an_error_never_silences_or_speaks_for_systemd(hostile_daemon, readable_src, tmp_path):
    notify = NotifyListener(str(tmp_path / "notify.sock"))
    try:
        daemon = hostile_daemon(env={"NOTIFY_SOCKET": notify.path})
        notify.wait_for("READY=1")
        # Not latin-1 (sdnotify's encoding), with assignments of its own after newlines.
        path = "/srv/€ \udcff\nSTOPPING=1\nX_HOSTILE=1/model.hef"
        fields = json.dumps({"model_type": "generic", "model_path": path})
        assert attack(ATTACKER, readable_src, daemon.socket_path, REQUEST, "load_model", fields).strip() == \
            p.FORBIDDEN
        notify.wait_for("STATUS=simulated backend, 0 model(s) loaded, queue 0, last error")
        reload_sent = time.monotonic()
        daemon.signal(signal.SIGHUP)
        deadline = reload_sent + 10
        while not notify.count("READY=1", since=reload_sent) and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = notify.lines()
        assert notify.count("RELOADING=1", since=reload_sent) == 1, lines
        assert notify.count("READY=1", since=reload_sent) == 1, lines
        assert not any(line.startswith(("X_HOSTILE", "STOPPING")) for line in lines), lines
        assert not any("€" in line or "model.hef" in line for line in lines), lines
    finally:
        notify.close()


def test_a_zero_size_beside_huge_ones_is_a_bad_request(hostile_daemon, readable_src, model_dir):
    daemon = hostile_daemon()
    # Zero elements, yet numpy cannot hold the shape: its other sizes multiply past its index range.
    tensor = {"dtype": "uint8", "shape": [0, 67108864, 67108864, 67108864], "data_b64": ""}
    fields = {"model_type": "generic", "model_path": str(model_dir / "net.hef"),
              "input_data": {"inputs": {"input_layer1": tensor}}}
    assert attack(ATTACKER, readable_src, daemon.socket_path, REQUEST, "infer", json.dumps(fields)).strip() == \
        p.BAD_REQUEST
    assert "internal error" not in daemon.log()


def test_simulate_does_not_exist_on_a_real_backend(hostile_daemon):
    daemon = hostile_daemon(backend="hailo")
    with Client(daemon.socket_path, timeout=30) as root:  # root could drive the simulated backend
        refusals = {}
        for action in ("simulate", "dance"):
            with pytest.raises(DeviceError) as info:
                root.request(action, temperature_c=90)
            refusals[action] = (info.value.code, info.value.message)
    assert refusals == {"simulate": (p.UNKNOWN_ACTION, "Unknown action: simulate"),
                        "dance": (p.UNKNOWN_ACTION, "Unknown action: dance")}


def test_simulation_knobs_that_hold_the_device_are_roots(hostile_daemon, readable_src, model_dir):
    """simulate_ms and simulate_hang_ms hold the simulated device (a hang outlasts every
    timeout): root's test hooks, like the simulate action."""
    daemon = hostile_daemon(watchdog={"infer_budget_s": 2})
    out = attack(ATTACKER, readable_src, daemon.socket_path, """
        import json
        from hailo_devmgr.client import Client, DeviceError, tensor
        import numpy as np
        image = {"inputs": {"input_layer1": tensor(np.zeros((224, 224, 3), np.uint8))}}
        codes = []
        for params in ({"simulate_hang_ms": 15000}, {"simulate_ms": 1500}):
            try:
                Client(SOCK, timeout=30).infer(ARGS[0], image, "generic", params)
                codes.append("ok")
            except DeviceError as exc:
                codes.append(exc.code)
        print(json.dumps(codes))
    """, str(model_dir / "net.hef"))
    assert json.loads(out) == ["forbidden", "forbidden"]
