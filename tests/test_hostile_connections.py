"""Hostile clients against the request path: budgets, back-pressure, descriptors, slowloris, slots.

Each test is an attack from issue 20 run as a real unprivileged uid; it
fails on the daemon before the per-uid pools, the bounded read-ahead and
the deadlines were added.
"""
from __future__ import annotations

import json
import textwrap
import time

import pytest

from hailo_devmgr.client import Client
from hostile import (ATTACKER, ATTACKER_2, attack, attacker, hostile_daemon, needs_root, open_fds,  # noqa: F401
                     rss_mib, socket_folder)

pytestmark = needs_root

# Helpers inside attacker scripts: raw frames, no client library.
RAW = """
import json, socket, struct, threading, time
def frame(message):
    body = json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body
def connect(hello=False):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(SOCK)
    if hello:
        sock.sendall(frame({"action": "hello", "protocol": 2}))
        length = struct.unpack(">I", sock.recv(4, socket.MSG_WAITALL))[0]
        sock.recv(length, socket.MSG_WAITALL)
    return sock
def closed_after(sock, started, timeout):
    # Seconds until the daemon closed this connection (None: still open).
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except socket.timeout:
        return None
    except OSError:
        pass
    return round(time.monotonic() - started, 2)
"""


def raw(code: str) -> str:
    return RAW + textwrap.dedent(code)


def ping_ms(socket_path: str, timeout: float = 10) -> float:
    started = time.monotonic()
    with Client(socket_path, timeout=timeout) as client:
        assert client.request("ping")["status"] == "ok"
    return (time.monotonic() - started) * 1000


def wait_for_line(process, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if text in line:
            return
        assert line or process.poll() is None, process.stderr.read()
    raise AssertionError(f"attacker never printed {text!r}")


def test_bodies_waiting_for_attachment_room_do_not_wedge_other_uids(hostile_daemon, readable_src):
    """Point 1: bodies that take the whole byte budget, each declaring attachments never sent."""
    daemon = hostile_daemon(max_pending_bytes=1024 * 1024, max_pending_bytes_per_uid=256 * 1024,
                            max_message_bytes=1024 * 1024, frame_timeout_s=2)
    process = attacker(ATTACKER, readable_src, daemon.socket_path, raw("""
        body = {"action": "infer", "model_path": "/x.hef", "attachments": [700000], "pad": ""}
        size = len(frame(body)) - 4
        body["pad"] = "x" * (262144 - size)       # four bodies: exactly the whole budget
        socks, started = [connect(hello=True) for _ in range(4)], time.monotonic()
        for sock in socks:
            threading.Thread(target=lambda s=sock: s.sendall(frame(body)), daemon=True).start()
        print("sent", flush=True)
        print(json.dumps([closed_after(sock, started, 20) for sock in socks]), flush=True)
    """))
    wait_for_line(process, "sent")
    time.sleep(0.5)
    during = [ping_ms(daemon.socket_path) for _ in range(5)]
    out, err = process.communicate(timeout=60)
    closed = json.loads(out.strip().splitlines()[-1])
    assert max(during) < 2000, during
    # The attacker's stalled frames are refused and cut off within a bound, not held forever.
    assert all(seconds is not None and seconds < 8 for seconds in closed), closed
    assert ping_ms(daemon.socket_path) < 2000
    assert "too many requests" in daemon.log()


@pytest.mark.parametrize("protocol", [1, 2])
def test_a_client_that_never_reads_its_answers_is_pushed_back_not_buffered(hostile_daemon, readable_src, protocol):
    """Point 2: tiny frames sent without reading the answers."""
    daemon = hostile_daemon(frame_timeout_s=2)
    before = rss_mib(daemon.process.pid)
    out = attack(ATTACKER, readable_src, daemon.socket_path, raw("""
        sock = connect(hello=ARGS[0] == "2")
        ping = frame({"action": "ping", "request_id": 1}) if ARGS[0] == "2" else frame({"action": "ping"})
        batch, sent, started = ping * 256, 0, time.monotonic()
        try:
            while time.monotonic() - started < 8:
                sock.sendall(batch)
                sent += 256
        except OSError:
            pass
        print(json.dumps({"sent": sent, "seconds": round(time.monotonic() - started, 2)}))
    """), str(protocol))
    result = json.loads(out)
    # Reading stops, the client's own socket buffer fills, and the daemon cuts it off.
    assert result["sent"] < 200_000, result
    assert result["seconds"] < 7.5, result
    assert rss_mib(daemon.process.pid) - before < 30
    assert ping_ms(daemon.socket_path) < 1000


def test_descriptors_sent_piecemeal_with_one_frame_are_closed_at_once(hostile_daemon, readable_src):
    """Point 3: a frame whose body comes in many sendmsg calls, each carrying 16 descriptors."""
    daemon = hostile_daemon(frame_timeout_s=10)
    before = open_fds(daemon.process.pid)
    process = attacker(ATTACKER, readable_src, daemon.socket_path, raw("""
        import array, os
        sock = connect(hello=True)
        read_end, write_end = os.pipe()
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [read_end] * 16))]
        sock.sendall(struct.pack(">I", 100000))
        for _ in range(200):                       # 3,200 descriptors within one frame
            sock.sendmsg([b" "], fds)
        print("sent", flush=True)
        time.sleep(5)
    """))
    wait_for_line(process, "sent")
    time.sleep(0.3)
    during = open_fds(daemon.process.pid)
    assert during - before <= 20, (before, during)
    assert ping_ms(daemon.socket_path) < 1000
    process.kill()
    process.communicate()


def test_length_prefixes_that_promise_much_and_send_little_hold_little(hostile_daemon, readable_src):
    """Point 6: budget slowloris, 64 MiB length prefixes followed by one byte."""
    daemon = hostile_daemon(frame_timeout_s=3)
    before = rss_mib(daemon.process.pid)
    process = attacker(ATTACKER, readable_src, daemon.socket_path, raw("""
        socks = []
        for _ in range(16):
            sock = connect()
            sock.sendall(struct.pack(">I", 64 * 1024 * 1024) + b"{")
            socks.append(sock)
        print("sent", flush=True)
        time.sleep(10)
    """))
    wait_for_line(process, "sent")
    time.sleep(0.5)
    during = [ping_ms(daemon.socket_path) for _ in range(5)]
    grown = rss_mib(daemon.process.pid) - before
    process.kill()
    process.communicate()
    assert max(during) < 1000, during
    assert grown < 48, f"RSS grew by {grown:.0f} MiB for 16 one-byte bodies"


def test_idle_connections_of_other_uids_cannot_take_every_slot(hostile_daemon, readable_src):
    """Idle connections of two uids fill max_connections: a third uid still gets in."""
    daemon = hostile_daemon(max_connections=16, max_connections_per_uid=8)
    hold = raw("""
        socks = [connect() for _ in range(8)]
        for sock in socks:
            sock.sendall(frame({"action": "ping"}))
            struct.unpack(">I", sock.recv(4, socket.MSG_WAITALL))
        print("sent", flush=True)
        time.sleep(10)
    """)
    holders = [attacker(uid, readable_src, daemon.socket_path, hold) for uid in (ATTACKER, ATTACKER_2)]
    try:
        for process in holders:
            wait_for_line(process, "sent")
        assert ping_ms(daemon.socket_path) < 1000
        assert "closed an idle connection of uid" in daemon.log()
    finally:
        for process in holders:
            process.kill()
            process.communicate()


def test_one_uid_cannot_flood_the_log(hostile_daemon, readable_src):
    """Every refused request is logged: one uid's thousands a second are rate-limited."""
    daemon = hostile_daemon()
    started = time.monotonic()
    attack(ATTACKER, readable_src, daemon.socket_path, raw("""
        sock = connect()
        for start in range(0, 5000, 100):
            sock.sendall(b"".join(frame({"action": "no_such_action"}) for _ in range(100)))
            for _ in range(100):
                length = struct.unpack(">I", sock.recv(4, socket.MSG_WAITALL))[0]
                sock.recv(length, socket.MSG_WAITALL)
    """))
    seconds = time.monotonic() - started
    lines = [line for line in daemon.log().splitlines() if "CLIENT_UID=65534" in line]
    assert len(lines) <= 200 + 20 * seconds + 1, (len(lines), seconds)
    assert ping_ms(daemon.socket_path) < 1000
