"""Hostile clients and the device queue: no uid, and no set of uids, can
keep another uid out of it (issue 20, point 9).

A root "blocker" holds the device (one long simulated inference), so what
the attackers queue behind it stays queued: the queue is as full as they
can make it when the victim (the test, uid 0) asks. Attackers are real
processes of unprivileged uids in the socket's group; each pipelines its
requests on v2 connections, keeps them open until told to stop (a file
appears) or its time is up, then prints the answers it got by code.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter

import pytest

from hailo_devmgr.client import Client
from hostile import ATTACKER, ATTACKER_2, attacker, hostile_daemon, needs_root, socket_folder  # noqa: F401
from test_daemon_scheduling import Raw, infer, wait_busy

pytestmark = needs_root

SMALL_IMAGE = {"dtype": "uint8", "shape": [2, 2, 3], "data_b64": "AAAAAAAAAAAAAAAA"}
BLOCKER_MS = 5000       # the device is busy this long: the attack and the victim's request fit in it
ATTACK_MAX_S = 25       # an attacker stops by itself after this, whatever happens

# ARGS: a request (JSON), how many to send, the stop file, the time limit (s).
FILL_QUEUE = """
import json, os, socket, struct, threading, time
from collections import Counter
from hailo_devmgr.wire import protocol as p

request, count, stop, limit_s = json.loads(ARGS[0]), int(ARGS[1]), ARGS[2], float(ARGS[3])
answers, lock = Counter(), threading.Lock()

def read_exactly(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data

def read(sock):
    return json.loads(read_exactly(sock, struct.unpack(">I", read_exactly(sock, 4))[0]))

def count_answers(sock):
    try:
        while True:
            answer = read(sock)
            code = answer.get("code", "ok")
            if "fair share" in answer.get("error", ""):
                code = "displaced"
            with lock:
                answers[code] += 1
    except (EOFError, OSError):
        pass

def connect():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(SOCK)
    sock.sendall(p.encode_frame({"action": "hello", "protocol": 2, "request_id": "hello"}))
    assert read(sock)["protocol"] == 2
    threading.Thread(target=count_answers, args=(sock,), daemon=True).start()
    return sock

IN_FLIGHT = 64  # max_inflight_per_connection
socks = [connect() for _ in range(0, count, IN_FLIGHT)]
for index in range(count):
    socks[index // IN_FLIGHT].sendall(p.encode_frame({**request, "request_id": index}))
deadline = time.monotonic() + limit_s
while not os.path.exists(stop) and time.monotonic() < deadline:
    time.sleep(0.05)
with lock:
    print(json.dumps(answers))
"""


def queue_by_client(daemon) -> dict:
    with Client(daemon.socket_path, timeout=10) as client:
        return client.status()["queue_by_client"]


def small_infer(model_dir, **fields) -> dict:
    return infer(model_dir, input_data={"inputs": {"input_layer1": SMALL_IMAGE}}, **fields)


class Siege:
    """A blocker on the device, then attackers filling the queue behind it."""

    def __init__(self, daemon, model_dir, readable_src, folder):
        self.daemon, self.model_dir, self.src = daemon, model_dir, readable_src
        self.stop_path = os.path.join(folder, "stop")
        self.attackers = []
        self.blocker = Raw(daemon.socket_path)
        self.blocker.send(small_infer(model_dir, request_id="blocker", simulate_ms=BLOCKER_MS))
        wait_busy(daemon)

    def start(self, uid: int, count: int, priority: str = "batch") -> None:
        request = small_infer(self.model_dir, priority=priority)
        self.attackers.append(attacker(uid, self.src, self.daemon.socket_path, FILL_QUEUE,
                                       json.dumps(request), str(count), self.stop_path, str(ATTACK_MAX_S)))

    def wait_queue(self, expected: dict, within: float = 15) -> None:
        """Until status shows ``expected`` as queue_by_client (attackers still connected)."""
        deadline = time.monotonic() + within
        while (seen := queue_by_client(self.daemon)) != expected:
            for process in self.attackers:
                assert process.poll() is None, f"an attacker ended early: {process.communicate()}"
            assert time.monotonic() < deadline, f"queue never became {expected}: {seen}"
            time.sleep(0.05)

    def victim(self, priorities: list[str]) -> list[str | None]:
        """The test's own requests (uid 0) while the attack goes on: their errors (None: served)."""
        victim = Raw(self.daemon.socket_path)
        for index, priority in enumerate(priorities):
            victim.send(small_infer(self.model_dir, request_id=index, priority=priority))
        answers = [victim.read() for _ in priorities]
        victim.close()
        assert all("outputs" in answer["result"] for answer in answers if "error" not in answer)
        return [answer.get("error") for answer in answers]

    def answers(self) -> Counter:
        """Stop the attackers; the answers they got, all together (their queued rest is dropped)."""
        open(self.stop_path, "w").close()
        total = Counter()
        for process in self.attackers:
            out, err = process.communicate(timeout=ATTACK_MAX_S + 10)
            assert process.returncode == 0, err
            total.update(json.loads(out))
        return total

    def end(self) -> None:
        """After a failure too: no attacker outlives its test."""
        for process in self.attackers:
            if process.poll() is None:
                process.kill()
                process.communicate()
        self.blocker.close()


@pytest.fixture
def besiege(hostile_daemon, model_dir, readable_src, socket_folder):
    """Factory: besiege(**scheduling) -> a Siege of a fresh daemon (tiny images, 20 ms inferences)."""
    sieges = []

    def start(**scheduling) -> Siege:
        daemon = hostile_daemon(simulated={"load_ms": 1, "infer_ms": 20, "image_shape": [2, 2, 3]},
                                scheduling=scheduling)
        sieges.append(Siege(daemon, model_dir, readable_src, socket_folder))
        return sieges[-1]

    yield start
    for siege in sieges:
        siege.end()


def test_one_uid_in_three_processes_holds_only_its_per_uid_share(besiege):
    """The attack as reported: 3 processes x 128 batch requests of one uid."""
    siege = besiege()   # max_queue 256, max_queue_per_client 128 (the defaults)
    for _ in range(3):
        siege.start(ATTACKER, 128)
    siege.wait_queue({f"uid {ATTACKER}": 128})  # not 256 (nor 384): the limit is per uid
    assert siege.victim(["interactive"]) == [None]
    got = siege.answers()
    assert got["busy"] == 256 and got["displaced"] == 0, got


def test_one_uid_that_fills_the_whole_queue_yields_to_another_uid(besiege):
    """Even allowed the whole queue (max_queue_per_client = max_queue), one uid
    cannot keep another out: the newcomer displaces the hog's newest request."""
    siege = besiege(max_queue=256, max_queue_per_client=256)
    for _ in range(3):
        siege.start(ATTACKER, 128)
    siege.wait_queue({f"uid {ATTACKER}": 256})
    assert siege.victim(["interactive"]) == [None]
    got = siege.answers()
    assert got["busy"] == 128 and got["displaced"] == 1, got   # 384 - 256 refused; one made room


def test_two_hostile_uids_filling_the_queue_cannot_lock_out_a_third(besiege):
    siege = besiege()
    siege.start(ATTACKER, 128, priority="interactive")  # a higher class buys no larger share
    siege.start(ATTACKER_2, 128)
    siege.wait_queue({f"uid {ATTACKER}": 128, f"uid {ATTACKER_2}": 128})
    # The victim gets in at any priority, several requests deep (its share is 256 // 3 = 85).
    assert siege.victim(["interactive", "batch", "batch", "normal"]) == [None] * 4
    got = siege.answers()
    assert got["displaced"] == 4 and got["busy"] == 0, got
