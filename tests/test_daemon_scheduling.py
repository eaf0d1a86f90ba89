"""Scheduling through the socket: v2 pipelining, priorities, deadlines, cancel,
back-pressure and metrics, on the simulated backend with fixed latencies.

A "blocker" is an inference made slow with model_params.simulate_ms; what
queues behind it shows the scheduler's choices. Whether a queued request
ever ran is read from the model cache: an inference on a model nobody
loaded would have loaded it.
"""
from __future__ import annotations

import os
import re
import socket
import threading
import time

import numpy as np
import pytest

from hailo_devmgr.wire import protocol as p
from wire import read_answer
from hailo_devmgr.client import Client, tensor

IMAGE = tensor(np.zeros((224, 224, 3), np.uint8))


class Raw:
    """A raw socket speaking frames, for exact control of what is in flight."""

    def __init__(self, path: str, hello: bool = True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        if hello:
            self.send({"action": "hello", "protocol": 2, "client": "test", "request_id": "hello"})
            answer = self.read()
            assert answer["protocol"] == 2 and "pipelining" in answer["features"]

    def send(self, message: dict) -> None:
        self.sock.sendall(p.encode_frame(message))

    def read(self) -> dict:
        answer = read_answer(self.sock)
        assert answer is not None, "connection closed"
        return answer

    def close(self) -> None:
        self.sock.close()


def infer(model_dir, name="net.hef", request_id=None, simulate_ms=None, **fields) -> dict:
    message = {"action": "infer", "model_type": "generic", "model_path": str(model_dir / name),
               "input_data": {"inputs": {"input_layer1": IMAGE}}, **fields}
    if request_id is not None:
        message["request_id"] = request_id
    if simulate_ms is not None:
        message["model_params"] = {"simulate_ms": simulate_ms}
    return message


def loaded(daemon) -> list[str]:
    with Client(daemon.socket_path, timeout=10) as client:
        return [model["model_path"].rsplit("/", 1)[-1] for model in client.status()["loaded_models"]]


def wait_busy(daemon):
    deadline = time.monotonic() + 10
    with Client(daemon.socket_path, timeout=10) as client:
        while not (client.status()["device_busy_with"] or "").startswith("infer"):
            assert time.monotonic() < deadline, "the blocker never started"
            time.sleep(0.01)


@pytest.fixture
def sched_daemon(start_daemon):
    return start_daemon(simulated={"load_ms": 1, "infer_ms": 1})


def test_hello_negotiates_and_v1_stays_in_order(sched_daemon, model_dir):
    v1 = Raw(sched_daemon.socket_path, hello=False)
    v1.send(infer(model_dir, request_id="first", simulate_ms=300))
    v1.send({"action": "ping", "request_id": "second"})
    assert [v1.read()["request_id"], v1.read()["request_id"]] == ["first", "second"]
    v1.send({"action": "hello", "protocol": 9, "request_id": "h"})
    assert v1.read()["protocol"] == 2  # the newest both speak
    v1.close()


def test_pipelined_answers_come_as_they_finish_matched_by_request_id(sched_daemon, model_dir):
    v2 = Raw(sched_daemon.socket_path)
    v2.send(infer(model_dir, request_id="slow", simulate_ms=400))
    v2.send({"action": "ping", "request_id": "quick"})
    v2.send(infer(model_dir, "two.hef", request_id=7) | {"input_data": {"inputs": {
        "a": tensor(np.ones((4, 4, 3), np.uint8)), "b": tensor(np.ones(8, np.float32))}}})
    answers = [v2.read() for _ in range(3)]
    assert answers[0]["request_id"] == "quick"  # not behind the slow inference
    by_id = {answer["request_id"]: answer for answer in answers}
    assert "output_layer1" in by_id["slow"]["result"]["outputs"]
    assert "sum" in by_id[7]["result"]["outputs"]  # each answer matched to its own request
    v2.close()


def test_interactive_overtakes_queued_batch_work(sched_daemon, model_dir):
    v2 = Raw(sched_daemon.socket_path)
    v2.send(infer(model_dir, request_id="blocker", simulate_ms=400))
    wait_busy(sched_daemon)
    for index in range(3):
        v2.send(infer(model_dir, request_id=f"batch{index}", priority="batch"))
    v2.send(infer(model_dir, request_id="urgent", priority="interactive"))
    order = [v2.read()["request_id"] for _ in range(5)]
    assert order[0] == "blocker" and order[1] == "urgent"
    assert order[2:] == ["batch0", "batch1", "batch2"]
    v2.close()


def test_deadline_passes_in_queue_answered_timeout_and_never_runs(sched_daemon, model_dir):
    v2 = Raw(sched_daemon.socket_path)
    v2.send(infer(model_dir, request_id="blocker", simulate_ms=800))
    wait_busy(sched_daemon)
    v2.send(infer(model_dir, "other.hef", request_id="late", timeout_ms=100))
    first = v2.read()
    assert first["request_id"] == "late" and first["code"] == p.TIMEOUT  # at its deadline, not after the blocker
    assert v2.read()["request_id"] == "blocker"
    assert "other.hef" not in loaded(sched_daemon)
    v2.close()


def test_cancel_by_request_id(sched_daemon, model_dir):
    v2 = Raw(sched_daemon.socket_path)
    v2.send(infer(model_dir, request_id="blocker", simulate_ms=500))
    wait_busy(sched_daemon)
    v2.send(infer(model_dir, "other.hef", request_id="unwanted"))
    v2.send({"action": "cancel", "target": "unwanted", "request_id": "c1"})
    v2.send({"action": "cancel", "target": "blocker", "request_id": "c2"})
    v2.send({"action": "cancel", "target": "nobody", "request_id": "c3"})
    answers = {answer["request_id"]: answer for answer in (v2.read() for _ in range(5))}
    assert answers["unwanted"]["code"] == p.CANCELLED
    assert answers["c1"]["cancelled"] is True
    assert answers["c2"]["cancelled"] is False and answers["c2"]["state"] == "running"
    assert answers["c3"]["state"] == "unknown"
    assert answers["blocker"]["status"] == "ok"  # a running inference cannot be pre-empted
    assert "other.hef" not in loaded(sched_daemon)
    v2.close()


def test_a_cancel_is_answered_even_at_the_in_flight_limit(start_daemon, model_dir):
    daemon = start_daemon(simulated={"load_ms": 1, "infer_ms": 1}, scheduling={"max_inflight_per_connection": 2})
    v2 = Raw(daemon.socket_path)
    v2.send(infer(model_dir, request_id="blocker", simulate_ms=500))
    wait_busy(daemon)
    v2.send(infer(model_dir, "other.hef", request_id="unwanted"))
    v2.send(infer(model_dir, request_id="third"))       # over the limit: busy
    v2.send({"action": "cancel", "target": "unwanted", "request_id": "c"})
    answers = {answer["request_id"]: answer for answer in (v2.read() for _ in range(4))}
    assert answers["third"]["code"] == p.BUSY
    assert answers["c"]["cancelled"] is True and answers["unwanted"]["code"] == p.CANCELLED
    assert answers["blocker"]["status"] == "ok"
    assert "other.hef" not in loaded(daemon)
    v2.close()


def test_a_request_id_in_flight_cannot_be_used_twice(sched_daemon, model_dir):
    v2 = Raw(sched_daemon.socket_path)
    v2.send(infer(model_dir, request_id="same", simulate_ms=400))
    wait_busy(sched_daemon)
    v2.send(infer(model_dir, "other.hef", request_id="same"))
    duplicate = v2.read()
    assert duplicate["code"] == p.BAD_REQUEST and "already in use" in duplicate["error"]
    original = v2.read()
    assert original["request_id"] == "same" and original["status"] == "ok"
    assert "other.hef" not in loaded(sched_daemon)
    v2.send(infer(model_dir, request_id="same"))  # free again once answered
    assert v2.read()["status"] == "ok"
    v2.close()


def test_a_load_on_demand_counts_against_the_deadline(start_daemon, model_dir):
    """The HailoRT timeout is what is left of timeout_ms after loading the
    model: a 300 ms inference after a 400 ms load does not fit in 600 ms."""
    daemon = start_daemon(simulated={"load_ms": 400, "infer_ms": 1})
    v2 = Raw(daemon.socket_path)
    v2.send(infer(model_dir, request_id="tight", simulate_ms=300, timeout_ms=600))
    answer = v2.read()
    given = re.search(r"timeout (\d+) ms", answer.get("error", ""))
    assert given and int(given.group(1)) <= 200, answer  # HailoRT got what was left, not 600 ms
    v2.send(infer(model_dir, request_id="roomy", simulate_ms=300, timeout_ms=600))  # loaded now
    assert v2.read()["status"] == "ok"
    v2.close()


@pytest.mark.parametrize("sends_more", [False, True], ids=["closes", "sends more then closes"])
def test_a_client_that_disconnects_has_its_queued_work_dropped(sched_daemon, model_dir, sends_more):
    """v1 too; a close behind bytes nobody read yet (the next request) is seen
    all the same, while the first request is still queued."""
    blocker = Raw(sched_daemon.socket_path)
    blocker.send(infer(model_dir, request_id="blocker", simulate_ms=800))
    wait_busy(sched_daemon)
    leaver = Raw(sched_daemon.socket_path, hello=False)
    leaver.send(infer(model_dir, "other.hef", request_id="never"))
    time.sleep(0.1)
    if sends_more:
        leaver.send({"action": "ping", "request_id": "unread"})
    leaver.close()
    assert blocker.read()["request_id"] == "blocker"
    with Client(sched_daemon.socket_path, timeout=10) as client:
        client.ping()  # the device has moved past the dropped request
    assert "other.hef" not in loaded(sched_daemon)
    assert "queued request(s) dropped" in sched_daemon.log()
    blocker.close()


def test_full_queue_answers_busy_at_once_with_retry_after(start_daemon, model_dir):
    daemon = start_daemon(simulated={"load_ms": 1, "infer_ms": 1},
                          scheduling={"max_queue": 2, "max_queue_per_client": 2})
    v2 = Raw(daemon.socket_path)
    v2.send(infer(model_dir, request_id="blocker", simulate_ms=600))
    wait_busy(daemon)
    for index in range(3):
        v2.send(infer(model_dir, request_id=f"q{index}"))
    first = v2.read()  # the one over the limit (validation order decides which), at once
    assert first["code"] == p.BUSY and first["retry_after_ms"] > 0
    rest = [v2.read() for _ in range(3)]
    assert all(answer["status"] == "ok" for answer in rest)  # everything else answered; nothing lost
    assert {answer["request_id"] for answer in [first, *rest]} == {"blocker", "q0", "q1", "q2"}
    v2.close()


def test_status_shows_queues_and_metrics_count_per_model_type(sched_daemon, model_dir):
    v2 = Raw(sched_daemon.socket_path)
    v2.send(infer(model_dir, request_id="blocker", simulate_ms=500))
    wait_busy(sched_daemon)
    v2.send(infer(model_dir, request_id="b", priority="batch"))
    time.sleep(0.1)
    with Client(sched_daemon.socket_path, timeout=10) as client:
        status = client.status()
        assert status["queue_by_class"] == {"interactive": 0, "normal": 0, "batch": 1}
        assert status["queue_by_client"] == {f"uid {os.getuid()}": 1}  # keyed by uid, not process
        assert v2.read()["request_id"] == "blocker" and v2.read()["request_id"] == "b"
        metrics = client.request("metrics")["metrics"]["model_types"]["generic"]
    assert metrics["requests"]["infer"] == 2
    assert metrics["queue_wait_ms"]["count"] == 2 and metrics["run_time_ms"]["count"] == 2
    # The batch request waited behind the ~500 ms blocker: its wait lands in a high bucket.
    assert metrics["queue_wait_ms"]["buckets_le_ms"]["+Inf"] == 2
    assert metrics["run_time_ms"]["sum_ms"] > 0
    v2.close()


def test_configured_priority_by_uid_applies_to_v1_clients(start_daemon, model_dir):
    daemon = start_daemon(simulated={"load_ms": 1, "infer_ms": 1},
                          scheduling={"client_priorities": [{"uid": os.getuid(), "priority": "batch"}]})
    v2 = Raw(daemon.socket_path)
    v2.send(infer(model_dir, request_id="blocker", simulate_ms=400))
    wait_busy(daemon)
    v2.send(infer(model_dir, request_id="mine"))  # no priority field: the uid's default
    time.sleep(0.1)
    with Client(daemon.socket_path, timeout=10) as client:
        assert client.status()["queue_by_class"]["batch"] == 1
    assert {v2.read()["request_id"], v2.read()["request_id"]} == {"blocker", "mine"}
    v2.close()


@pytest.mark.parametrize("field, value, text", [
    ("priority", "urgent", "priority must be one of interactive, normal, batch"),
    ("timeout_ms", 0, "timeout_ms must be >= 1"),
    ("timeout_ms", "soon", "timeout_ms must be an integer"),
])
def test_bad_scheduling_fields_are_bad_requests(sched_daemon, model_dir, field, value, text):
    v2 = Raw(sched_daemon.socket_path)
    v2.send(infer(model_dir, request_id=1, **{field: value}))
    answer = v2.read()
    assert answer["code"] == p.BAD_REQUEST and text in answer["error"]
    v2.send({"action": "cancel", "request_id": 2})  # no target: the id names what to cancel
    assert v2.read()["state"] == "unknown"
    v2.close()


def test_a_v1_client_that_pipelines_past_the_read_ahead_then_closes_runs_at_most_one_more_job(sched_daemon,
                                                                                                  model_dir):
    """More than the read-ahead bound queued behind its first request, then a
    close the daemon cannot see yet: once the first answer cannot be written,
    none of what was read ahead runs."""
    (model_dir / "tiny.hef").write_text("inputs: [{name: x, shape: [16], format: UINT8}]\n"
                                        "outputs: [{name: y, shape: [16], format: UINT8}]\nmemory_mb: 1\n")
    tiny = {"action": "infer", "model_type": "generic", "model_path": str(model_dir / "tiny.hef"),
            "input_data": {"inputs": {"x": tensor(np.zeros(16, np.uint8))}}}
    blocker = Raw(sched_daemon.socket_path)
    blocker.send(infer(model_dir, request_id="blocker", simulate_ms=800))
    wait_busy(sched_daemon)
    leaver = Raw(sched_daemon.socket_path, hello=False)
    leaver.sock.sendall(b"".join(p.encode_frame({**tiny, "request_id": n}) for n in range(150)))  # ~35 KB
    leaver.close()
    assert blocker.read()["request_id"] == "blocker"
    time.sleep(0.5)
    with Client(sched_daemon.socket_path, timeout=10) as client:
        uses = [model["uses"] for model in client.status()["loaded_models"] if model["model_path"].endswith("tiny.hef")]
    assert uses in ([], [1])
    blocker.close()


def test_pipelined_answers_larger_than_the_socket_buffer_never_interleave(start_daemon, model_dir):
    """Large answers finishing all the time while a slow reader takes them: each
    frame arrives whole (an answer that had to wait its turn must not let a
    newer one be written into the middle of it)."""
    (model_dir / "wide.hef").write_text("inputs: [{name: x, shape: [16], format: UINT8}]\n"
                                        "outputs: [{name: y, shape: [200000], format: UINT8}]\nmemory_mb: 1\n")
    daemon = start_daemon(simulated={"load_ms": 1, "infer_ms": 0})
    raw = Raw(daemon.socket_path)
    x = tensor(np.arange(16, dtype=np.uint8))
    in_flight, stop = threading.Semaphore(48), time.monotonic() + 4
    sent = []

    def send():
        while time.monotonic() < stop:
            in_flight.acquire()
            n = len(sent) + 1
            sent.append(n)
            if n % 3:
                raw.send({"action": "infer", "model_type": "generic", "model_path": str(model_dir / "wide.hef"),
                          "input_data": {"inputs": {"x": x}}, "request_id": n, "model_params": {"simulate_ms": n % 4}})
            else:
                raw.send({"action": "ping", "request_id": n})
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    answered = set()
    while time.monotonic() < stop or len(answered) < len(sent):
        answer = raw.read()   # a frame cut by another would not decode (or not frame)
        assert answer["status"] == "ok", answer
        answered.add(answer["request_id"])
        in_flight.release()
        time.sleep(0.001)
    sender.join(10)
    assert answered == set(sent) and len(sent) > 100
    raw.close()


def test_a_request_abandoned_while_its_job_runs_leaves_nothing_in_the_log(start_daemon, model_dir):
    """The client closes while its job runs and fails (its timeout_ms is
    shorter than the inference): nobody is left to read the failure, and it
    must not be logged as a Future exception never retrieved (a line no uid
    limit applies to: hundreds a second under a flood)."""
    daemon = start_daemon(simulated={"load_ms": 1, "infer_ms": 1})
    for _ in range(5):
        v2 = Raw(daemon.socket_path)
        v2.send(infer(model_dir, request_id="doomed", simulate_ms=400, timeout_ms=200))
        wait_busy(daemon)
        v2.close()
    wait_until_idle = time.monotonic() + 10
    with Client(daemon.socket_path, timeout=10) as client:
        while client.status()["device_busy_with"]:
            assert time.monotonic() < wait_until_idle
            time.sleep(0.05)
        client.ping()
    assert "never retrieved" not in daemon.log()


def test_a_client_that_pipelines_hundreds_of_requests_does_not_keep_another_waiting_behind_them(start_daemon):
    """Frames read ahead are answered one per connection per pass of the
    event loop: another client's ping is answered among the first of a
    300-status burst, not after all of it (uptime_seconds orders them)."""
    daemon = start_daemon(scheduling={"max_inflight_per_connection": 1000})
    flood, victim = Raw(daemon.socket_path), Raw(daemon.socket_path)
    flood.sock.sendall(b"".join(p.encode_frame({"action": "status", "request_id": i}) for i in range(300)))
    victim.send({"action": "ping", "request_id": "victim"})
    answered_at = victim.read()["uptime_seconds"]
    burst = [flood.read()["uptime_seconds"] for _ in range(300)]
    after = sum(at > answered_at for at in burst)
    assert after >= 150, f"the ping was answered after {300 - after} of the 300 status answers"
    flood.close()
    victim.close()
