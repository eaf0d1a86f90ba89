"""Hostile clients and shared memory: references a request makes the daemon
map, and the worker time validating them takes (issue 20, points 4 and 5).

The attacker (a real unprivileged uid in the socket's group) sends v2
`infer` requests whose unused `input_data` key holds many references to
one sealed memfd, for a model path that does not exist: only validation
sees them, never the device. The victim is the test (uid 0).
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

from hailo_devmgr.daemon import workers
from hailo_devmgr.client import Client
from hostile import ATTACKER, ATTACKER_2, attack, attacker, hostile_daemon, needs_root, rss_mib, socket_folder  # noqa: F401

# ARGS: memfd MiB, references per request, requests (pipelined on one connection), model path.
# Prints "sent" once every request is out, then {"codes": [...], "seconds": s}.
REFERENCES = """
import fcntl, json, os, socket, struct, time

size_mib, per_request, requests, model_path = int(ARGS[0]), int(ARGS[1]), int(ARGS[2]), ARGS[3]
fd = os.memfd_create("attack", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
chunk = b"\\1" * (1 << 20)
for _ in range(size_mib):
    os.write(fd, chunk)
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(SOCK)

def send(message, fds=()):
    body = json.dumps(message).encode()
    frame = struct.pack(">I", len(body)) + body
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i" * len(fds), *fds))] if fds else []
    sent = sock.sendmsg([frame], rights)
    sock.sendall(frame[sent:])

def read_exactly(size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the daemon closed the connection"
        data += chunk
    return data

def read():
    return json.loads(read_exactly(struct.unpack(">I", read_exactly(4))[0]))

send({"action": "hello", "protocol": 2, "features": ["attachments"], "request_id": "hello"})
assert read()["status"] == "ok"
ref = {"dtype": "uint8", "shape": [size_mib << 20], "shm": 0, "offset": 0}
start = time.monotonic()
for index in range(requests):
    send({"action": "infer", "model_type": "generic", "model_path": model_path, "request_id": index,
          "input_data": {"inputs": {}, "unused": [ref] * per_request}, "fds": 1}, [fd])
print("sent", flush=True)
codes = [read().get("code", "ok") for _ in range(requests)]
print(json.dumps({"codes": codes, "seconds": round(time.monotonic() - start, 3)}), flush=True)
"""


def vm_pte_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmPTE:"):
            return int(line.split()[1])
    raise AssertionError("no VmPTE")


class PeakPageTables:
    """Samples the daemon's VmPTE every few milliseconds while in the ``with`` block."""

    def __init__(self, pid: int):
        self.pid, self.peak = pid, vm_pte_kib(pid)
        self.baseline = self.peak
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, vm_pte_kib(self.pid))

    def __enter__(self) -> "PeakPageTables":
        self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._sampler.join()

    @property
    def grown_mib(self) -> float:
        return (self.peak - self.baseline) / 1024


@needs_root
def test_many_references_to_one_memfd_are_refused_before_anything_is_mapped(hostile_daemon, readable_src,
                                                                             model_dir):
    """Point 4: 400 references to one 64 MiB memfd in a 26 KB request. Before:
    each was mapped with MAP_POPULATE (25 GiB mapped, about 50 MiB of page
    tables, seconds of worker time) and validation went on. Now the bytes
    they name are summed from dtype and shape first: `too_large` at once."""
    daemon = hostile_daemon()
    pid = daemon.process.pid
    rss_before = rss_mib(pid)
    with PeakPageTables(pid) as page_tables:
        out = attack(ATTACKER, readable_src, daemon.socket_path, REFERENCES, "64", "400", "1",
                     str(model_dir / "absent.hef"), timeout=60)
    result = json.loads(out.splitlines()[-1])
    assert result["codes"] == ["too_large"], result
    assert result["seconds"] < 2, result
    assert page_tables.grown_mib < 4, f"page tables grew by {page_tables.grown_mib:.1f} MiB"
    assert rss_mib(pid) - rss_before < 64
    with Client(daemon.socket_path, timeout=10) as client:
        assert client.ping()["status"] == "ok"


def _load_seconds(client: Client, model_dir) -> float:
    started = time.monotonic()
    answer = client.load_model(str(model_dir / "net.hef"), model_type="generic")
    assert answer["status"] == "ok", answer
    return time.monotonic() - started


def _worst_load_seconds(client: Client, model_dir, window_s: float) -> float:
    """The slowest of the loads done one after another for ``window_s``: the
    attack's frames may not all have been read when the first one starts."""
    worst, end = 0.0, time.monotonic() + window_s
    while time.monotonic() < end:
        worst = max(worst, _load_seconds(client, model_dir))
    return worst


@needs_root
def test_one_uids_validations_do_not_delay_another_uids_load_model(hostile_daemon, readable_src, model_dir):
    """Point 5: 12 pipelined requests with 100 references each to one 64 MiB
    memfd (the largest uint8 tensor max_tensor_elements allows). Before, they
    took every thread of the shared pool first come, first served, and
    another client's `load_model` of a loaded model waited for them (4 s). The victim's latency is compared with its own
    baseline, measured just before."""
    daemon = hostile_daemon()
    with Client(daemon.socket_path, timeout=120) as victim:
        _load_seconds(victim, model_dir)  # loaded now: later loads only validate
        baseline = min(_load_seconds(victim, model_dir) for _ in range(5))
        process = attacker(ATTACKER, readable_src, daemon.socket_path, REFERENCES, "64", "100", "12",
                           str(model_dir / "absent.hef"))
        try:
            assert process.stdout.readline().strip() == "sent", process.stderr.read()
            attacked = _worst_load_seconds(victim, model_dir, 1.5)
        finally:
            process.kill()
            process.wait()
    assert attacked < baseline + 1.0, f"load_model took {attacked:.2f} s under attack, {baseline:.3f} s before"


def test_the_worker_pool_serves_uids_in_turn():
    """One uid with queued work never delays another's next job by more than
    one of its own; with every worker of one uid's, a worker is still free."""
    async def main():
        pool = workers.FairPool(workers=2)   # one uid may hold one of them
        started, gates = [], {}

        def job(name):
            started.append(name)
            assert gates.setdefault(name, threading.Event()).wait(10)
            return name

        async def release(name, then_started: int):
            gates.setdefault(name, threading.Event()).set()
            for _ in range(200):
                if len(started) >= then_started:
                    return
                await asyncio.sleep(0.01)
        heavy = [asyncio.ensure_future(pool.run("uid 1", job, f"a{i}")) for i in range(4)]
        await asyncio.sleep(0.1)
        light = [asyncio.ensure_future(pool.run("uid 2", job, f"b{i}")) for i in range(2)]
        await asyncio.sleep(0.1)
        assert started == ["a0", "b0"]       # b0 did not wait behind a1..a3
        await release("a0", 3)               # uid 2 is running b0: uid 1 goes on
        await release("b0", 4)               # uid 1 is running a1: uid 2's turn
        assert started == ["a0", "b0", "a1", "b1"]
        for name in ("a1", "b1", "a2", "a3"):
            await release(name, 0)
        assert await asyncio.gather(*heavy, *light) == ["a0", "a1", "a2", "a3", "b0", "b1"]
    asyncio.run(main())


def test_a_job_cancelled_while_queued_never_runs():
    async def main():
        pool = workers.FairPool(workers=1)
        ran, gate = [], threading.Event()
        first = asyncio.ensure_future(pool.run("k", lambda: gate.wait(10)))
        queued = asyncio.ensure_future(pool.run("k", ran.append, "queued"))
        await asyncio.sleep(0.05)
        queued.cancel()
        gate.set()
        await first
        assert await pool.run("k", ran.append, "next") is None
        assert ran == ["next"]
    asyncio.run(main())


def test_only_small_values_count_as_small():
    assert workers.is_small({"action": "load_model", "model_path": "/m/net.hef", "model_params": {"a": [1, 2]}})
    assert not workers.is_small({"x": list(range(10 ** 6))})
    assert not workers.is_small({"x": "y" * (1 << 20)})
    assert not workers.is_small({str(i): i for i in range(10 ** 5)})
