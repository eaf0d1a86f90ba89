"""Registered shared-memory buffers (protocol v2, transport version 2) and the
memory rules of every memfd: sealed sizes, no holes, nothing mapped that a
tensor does not use.

A registered buffer is sent once, then named by many requests; the client
rewrites it through the mapping it made before sealing. These tests check
that the daemon reads it in place (a rewrite changes the next result), that
every bad registration or reference is a clear error on a connection that
stays usable, that limits hold, that the client library reuses buffers
without ever mixing two requests' inputs, and that no descriptor leaks.
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import mmap
import os
import time

import numpy as np
import pytest

from hailo_devmgr.wire import protocol as p
from hailo_devmgr.wire import shm
from hailo_devmgr.wire import transport as t
from hailo_devmgr.client import AsyncClient, Client
from hailo_devmgr.client.buffers import ClientBuffers, WritableBuffer
from wire import Raw, assert_no_leak, infer_message, pipe_end, ping_ok, settled_fds

A = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
B = np.linspace(0, 1, 8, dtype=np.float32)
FEATURES = ("attachments", "shm", "shm_buffers")


@pytest.fixture
def fast_daemon(start_daemon):
    return start_daemon(simulated={"infer_ms": 0, "load_ms": 0})


def run_async(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def v1_outputs(daemon, model_dir, a, b) -> dict:
    with Client(daemon.socket_path, timeout=30) as client:
        return client.infer(str(model_dir / "two.hef"), {"inputs": {"a": a, "b": b}},
                            model_type="generic")["result"]["outputs"]


def assert_v1_outputs(daemon, model_dir, a, b, outputs: dict) -> None:
    """``outputs`` are what a v1 (base64) client gets for the same inputs."""
    for name, value in v1_outputs(daemon, model_dir, a, b).items():
        assert np.array_equal(outputs[name], value)


def register(raw: Raw, fd: int, request_id="reg") -> dict:
    raw.send({"action": "register_buffer", "request_id": request_id, "fds": 1}, fds=[fd])
    os.close(fd)
    return raw.read()


def buffer_refs(buffer_id: int) -> dict:
    """A at offset 0 and B at offset 64 of one buffer."""
    return {"a": {"dtype": "uint8", "shape": [4, 4, 3], "buffer": buffer_id, "offset": 0},
            "b": {"dtype": "float32", "shape": [8], "buffer": buffer_id, "offset": 64}}


def sealed(size: int, seals: int, written: int | None = None) -> int:
    """A memfd of ``size`` bytes, the first ``written`` of them written (all by default)."""
    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    os.pwrite(fd, bytes(size if written is None else written), 0)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


# ---------------------------------------------------------------- the seals themselves

def test_a_sealed_buffer_can_be_written_only_through_the_mapping_made_before():
    buffer = WritableBuffer(10_000)
    try:
        assert buffer.size == 3 * mmap.PAGESIZE  # whole pages
        buffer.write(A)
        assert bytes(buffer.array[:48]) == A.tobytes()
        fd = buffer.take_fd()
        try:
            with pytest.raises(PermissionError):
                os.pwrite(fd, b"x", 0)
            with pytest.raises(PermissionError):
                mmap.mmap(fd, buffer.size)  # a new writable mapping
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
            libc = ctypes.CDLL(None, use_errno=True)
            punch = libc.fallocate(fd, 3, ctypes.c_long(0), ctypes.c_long(4096))  # PUNCH_HOLE | KEEP_SIZE
            assert punch == -1 and ctypes.get_errno() == errno.EPERM
            assert shm.check_memfd(fd, "buffer", reusable=True) == buffer.size
        finally:
            os.close(fd)
    finally:
        buffer.close()


# ---------------------------------------------------------------- against the daemon

def test_a_registered_buffer_is_read_in_place_request_after_request(fast_daemon, model_dir):
    raw = Raw(fast_daemon.socket_path, features=FEATURES)
    buffer = WritableBuffer(4096)
    answer = register(raw, buffer.take_fd())
    assert answer["status"] == "ok" and answer["size"] == 4096 and answer["request_id"] == "reg"
    buffer_id = answer["buffer"]
    for step in range(3):
        a, b = (A + step).astype(np.uint8), B * (step + 1)
        buffer.array[:48] = a.reshape(-1)
        buffer.array[64:96] = b.view(np.uint8)
        raw.send(infer_message(model_dir, buffer_refs(buffer_id), request_id=step))
        answer = raw.read()
        assert answer["status"] == "ok" and answer["request_id"] == step, answer
        expected = v1_outputs(fast_daemon, model_dir, a, b)
        for name, value in expected.items():
            assert np.array_equal(answer["result"]["outputs"][name], value)
    with Client(fast_daemon.socket_path, timeout=10) as client:
        [mine] = [c for c in client.status()["clients"] if c["shm_buffers"]]
        assert mine["shm_buffer_bytes"] == 4096 and mine["protocol"] == 2
    raw.send({"action": "unregister_buffer", "buffer": buffer_id, "request_id": "unreg"})
    assert raw.read()["unregistered"] is True
    raw.send(infer_message(model_dir, buffer_refs(buffer_id)))
    answer = raw.read()
    assert answer["code"] == p.BAD_REQUEST and "not a registered buffer" in answer["error"]
    raw.close()
    buffer.close()


FUTURE = shm.SIZE_SEALS | shm.F_SEAL_FUTURE_WRITE


@pytest.mark.parametrize("message, make_fds, text", [
    ({"action": "register_buffer"}, None, "exactly one memfd"),
    ({"action": "register_buffer", "fds": 2}, lambda: [sealed(4096, FUTURE), sealed(4096, FUTURE)],
     "exactly one memfd"),
    ({"action": "register_buffer", "fds": 1}, lambda: [pipe_end()], "not a memfd"),
    ({"action": "register_buffer", "fds": 1}, lambda: [sealed(4096, 0)], "must be sealed"),
    ({"action": "register_buffer", "fds": 1}, lambda: [sealed(4096, shm.SIZE_SEALS)], "F_SEAL_FUTURE_WRITE"),
    ({"action": "register_buffer", "fds": 1}, lambda: [sealed(4096, fcntl.F_SEAL_GROW | shm.F_SEAL_FUTURE_WRITE)],
     "F_SEAL_SHRINK"),
    ({"action": "register_buffer", "fds": 1}, lambda: [sealed(3 * 4096, FUTURE, written=4096)], "hole"),
    ({"action": "register_buffer", "fds": 1}, lambda: [sealed(0, FUTURE)], "is empty"),
    ({"action": "unregister_buffer"}, None, "needs buffer"),
    ({"action": "unregister_buffer", "buffer": 99}, None, "not a registered buffer"),
    ({"action": "unregister_buffer", "buffer": True}, None, "not a registered buffer"),
])
def test_bad_registrations_are_clear_errors(fast_daemon, message, make_fds, text):
    pid = fast_daemon.process.pid
    ping_ok(fast_daemon)
    before = settled_fds(pid)
    raw = Raw(fast_daemon.socket_path, features=FEATURES)
    fds = make_fds() if make_fds else []
    raw.send({**message, "request_id": "bad"}, fds=fds)
    t.close_fds(fds)
    answer = raw.read()
    assert answer["code"] == p.BAD_REQUEST and text in answer["error"] and answer["request_id"] == "bad", answer
    raw.send({"action": "ping", "request_id": "after"})
    assert raw.read()["status"] == "ok"  # the connection stays usable
    raw.close()
    assert_no_leak(pid, before)


def test_bad_buffer_references_are_clear_errors(fast_daemon, model_dir):
    raw = Raw(fast_daemon.socket_path, features=FEATURES)
    buffer_id = register(raw, sealed(4096, FUTURE))["buffer"]
    ref = {"dtype": "uint8", "shape": [4, 4, 3]}
    cases = [
        ({**ref, "buffer": buffer_id + 1}, "not a registered buffer"),
        ({**ref, "buffer": "1"}, "not a registered buffer"),
        ({**ref, "buffer": buffer_id, "offset": 4090}, "too small for 48 bytes at offset 4090"),
        ({**ref, "buffer": buffer_id, "offset": -1}, "offset must be"),
        ({**ref, "buffer": buffer_id, "shm": 0}, "exactly one of attachment, shm or buffer"),
    ]
    for bad, text in cases:
        raw.send(infer_message(model_dir, {"a": bad, "b": {"dtype": "float32", "shape": [8], "buffer": buffer_id,
                                                           "offset": 64}}))
        answer = raw.read()
        assert answer["code"] == p.BAD_REQUEST and text in answer["error"], (bad, answer)
    raw.close()


def test_registered_buffers_are_per_connection(fast_daemon, model_dir):
    first = Raw(fast_daemon.socket_path, features=FEATURES)
    buffer_id = register(first, sealed(4096, FUTURE))["buffer"]
    second = Raw(fast_daemon.socket_path, features=FEATURES)
    second.send(infer_message(model_dir, buffer_refs(buffer_id)))
    answer = second.read()
    assert answer["code"] == p.BAD_REQUEST and "not a registered buffer of this connection" in answer["error"]
    first.close()
    second.close()


def test_registered_bytes_are_limited_per_connection(start_daemon):
    daemon = start_daemon(shm_buffer_max_bytes=3 * 4096)
    raw = Raw(daemon.socket_path, features=FEATURES)
    raw.send({"action": "hello", "protocol": 2, "request_id": "h", "features": list(FEATURES)})
    limits = raw.read()["limits"]
    assert limits["shm_buffer_max_bytes"] == 3 * 4096 and limits["max_shm_buffers"] == shm.MAX_BUFFERS
    ids = [register(raw, sealed(4096, FUTURE))["buffer"] for _ in range(3)]
    answer = register(raw, sealed(4096, FUTURE))
    assert answer["code"] == p.BAD_REQUEST and "total at most 12288 bytes" in answer["error"]
    raw.send({"action": "unregister_buffer", "buffer": ids[0], "request_id": 1})
    assert raw.read()["status"] == "ok"
    assert register(raw, sealed(4096, FUTURE))["status"] == "ok"  # room again
    raw.close()


def test_registered_buffers_are_limited_in_number(fast_daemon):
    raw = Raw(fast_daemon.socket_path, features=FEATURES)
    for _ in range(shm.MAX_BUFFERS):
        assert register(raw, sealed(4096, FUTURE))["status"] == "ok"
    answer = register(raw, sealed(4096, FUTURE))
    assert answer["code"] == p.BAD_REQUEST and f"At most {shm.MAX_BUFFERS} registered buffers" in answer["error"]
    raw.close()


def test_registered_buffers_can_be_turned_off(start_daemon, model_dir):
    daemon = start_daemon(shm_buffer_max_bytes=0, simulated={"infer_ms": 0, "load_ms": 0})
    raw = Raw(daemon.socket_path, features=FEATURES)
    raw.send({"action": "hello", "protocol": 2, "request_id": "h", "features": list(FEATURES)})
    assert "shm_buffers" not in raw.read()["features"]
    answer = register(raw, sealed(4096, FUTURE))
    assert answer["code"] == p.BAD_REQUEST and "turned off" in answer["error"]
    raw.close()

    async def main():  # the client falls back to one-shot memfds
        async with AsyncClient(daemon.socket_path, transport="shm", timeout=30) as client:
            assert "shm_buffers" not in client.features
            answer = await client.infer(str(model_dir / "two.hef"), {"inputs": {"a": A, "b": B}},
                                        model_type="generic")
            return answer["result"]["outputs"]
    got = run_async(main())
    assert_v1_outputs(daemon, model_dir, A, B, got)


def test_buffer_actions_need_protocol_2(fast_daemon):
    raw = Raw(fast_daemon.socket_path, hello=False)
    raw.send({"action": "unregister_buffer", "buffer": 1, "request_id": 1})
    answer = raw.read()
    assert answer["code"] == p.BAD_REQUEST and "needs protocol 2" in answer["error"]
    raw.send({"action": "register_buffer", "request_id": 2})
    answer = raw.read()
    assert answer["code"] == p.BAD_REQUEST and "needs protocol 2" in answer["error"]
    raw.close()


# ---------------------------------------------------------------- one-shot memfds: only what a tensor uses

def shmem_mib() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no Shmem in /proc/meminfo")


def test_a_sparse_memfd_costs_the_daemon_nothing_and_holes_are_refused(fast_daemon, model_dir):
    """A 1 GiB memfd holding one small tensor: the daemon maps (and allocates)
    only that tensor's page; a tensor over never-written pages is refused
    (reading them would allocate them in the daemon's own memory)."""
    raw = Raw(fast_daemon.socket_path)
    big = os.memfd_create("sparse", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(big, 1 << 30)
    os.pwrite(big, A.tobytes() + bytes(16) + B.tobytes(), 0)
    fcntl.fcntl(big, fcntl.F_ADD_SEALS, shm.REQUIRED_SEALS)
    before = shmem_mib()
    refs = {"a": {"dtype": "uint8", "shape": [4, 4, 3], "shm": 0, "offset": 0},
            "b": {"dtype": "float32", "shape": [8], "shm": 0, "offset": 64}}
    raw.send(infer_message(model_dir, refs, fds=1), fds=[big])
    answer = raw.read()
    assert answer["status"] == "ok", answer
    assert_v1_outputs(fast_daemon, model_dir, A, B, answer["result"]["outputs"])
    assert shmem_mib() - before < 256  # mapping the whole memfd would have allocated 1 GiB

    over_hole = {**refs, "a": {"dtype": "uint8", "shape": [1 << 20], "shm": 0, "offset": 0}}
    raw.send(infer_message(model_dir, over_hole, fds=1), fds=[big])
    answer = raw.read()
    assert answer["code"] == p.BAD_REQUEST and "hole" in answer["error"], answer
    assert shmem_mib() - before < 256
    os.close(big)
    raw.close()


# ---------------------------------------------------------------- the client library

def test_the_client_reuses_its_buffers(fast_daemon, model_dir):
    path = str(model_dir / "two.hef")
    expected = v1_outputs(fast_daemon, model_dir, A, B)

    async def main():
        async with AsyncClient(fast_daemon.socket_path, transport="shm", timeout=30) as client:
            assert "shm_buffers" in client.features
            for _ in range(10):
                answer = await client.infer(path, {"inputs": {"a": A, "b": B}}, model_type="generic")
                for name, value in expected.items():
                    assert np.array_equal(answer["result"]["outputs"][name], value)
            status = await client.status()
            return [c for c in status["clients"] if c["shm_buffers"]]
    [mine] = run_async(main())
    assert mine["shm_buffers"] == 2  # one per input, registered once, used 10 times


def test_pipelined_requests_never_see_each_others_buffers(fast_daemon, model_dir):
    """40 requests in flight at once, each with its own inputs: more than the
    16 buffers a connection may register, so some go in one-shot memfds."""
    path = str(model_dir / "two.hef")
    inputs = [((A + i).astype(np.uint8), B * (i + 1)) for i in range(40)]
    expected = [v1_outputs(fast_daemon, model_dir, a, b) for a, b in inputs]

    async def main():
        async with AsyncClient(fast_daemon.socket_path, transport="shm", timeout=60) as client:
            for _ in range(3):
                answers = await asyncio.gather(*(client.infer(path, {"inputs": {"a": a, "b": b}},
                                                              model_type="generic") for a, b in inputs))
                for answer, want in zip(answers, expected):
                    for name, value in want.items():
                        assert np.array_equal(answer["result"]["outputs"][name], value)
            status = await client.status()
            return [c for c in status["clients"] if c["shm_buffers"]]
    [mine] = run_async(main())
    assert 2 <= mine["shm_buffers"] <= shm.MAX_BUFFERS


def test_the_client_stays_within_the_daemons_buffer_limit(start_daemon, model_dir):
    """Room for one page only: one input goes in the registered buffer, the
    other in a one-shot memfd; results stay right."""
    daemon = start_daemon(shm_buffer_max_bytes=4096, simulated={"infer_ms": 0, "load_ms": 0})
    path = str(model_dir / "two.hef")

    async def main():
        async with AsyncClient(daemon.socket_path, transport="shm", timeout=30) as client:
            answers = [await client.infer(path, {"inputs": {"a": A, "b": B}}, model_type="generic")
                       for _ in range(3)]
            status = await client.status()
            return answers, [c for c in status["clients"] if c["shm_buffers"]]
    answers, [mine] = run_async(main())
    assert mine["shm_buffers"] == 1 and mine["shm_buffer_bytes"] == 4096
    for answer in answers:
        assert_v1_outputs(daemon, model_dir, A, B, answer["result"]["outputs"])


def test_client_buffers_make_room_by_unregistering_idle_ones():
    registered, unregistered = [], []

    async def register_(buffer):
        registered.append(buffer.size)
        return len(registered)

    async def unregister_(buffer):
        unregistered.append(buffer.buffer_id)

    page = mmap.PAGESIZE
    pool = ClientBuffers(register_, unregister_, max_count=2, max_bytes=3 * page)

    async def main():
        def arrays(nbytes):
            return [np.zeros(nbytes, np.uint8)]
        await pool.prepare(arrays(page), 1)
        await pool.prepare(arrays(2 * page), 1)  # fits beside the first
        assert registered == [page, 2 * page] and unregistered == []
        await pool.prepare(arrays(3 * page), 1)  # both idle ones go to make room
        assert registered[-1] == 3 * page and sorted(unregistered) == [1, 2]
        placed = pool.placer("r1", 1)(np.zeros(3 * page, np.uint8))
        assert placed == {"buffer": 3, "offset": 0}
        await pool.prepare(arrays(page), 1)      # the busy one stays: no room, no new buffer
        assert pool.placer("r2", 1)(np.zeros(page, np.uint8)) is None  # → a one-shot memfd
        pool.release("r1")
        assert pool.placer("r3", 1)(np.ones(3 * page, np.uint8)) == {"buffer": 3, "offset": 0}
    try:
        run_async(main())
    finally:
        pool.close()


def test_shared_arrays_travel_without_a_copy(fast_daemon, model_dir):
    """Arrays made by shared_array live in buffers of their own: filled in
    place and sent as they are (no pool buffer is ever registered)."""
    path = str(model_dir / "two.hef")

    async def main():
        results = []
        # transport="shm": any array not in a shared buffer would be copied into a pool buffer
        async with AsyncClient(fast_daemon.socket_path, transport="shm", timeout=30) as client:
            a = await client.shared_array((4, 4, 3), np.uint8)
            b = await client.shared_array(8, np.float32)
            assert a.shape == (4, 4, 3) and b.dtype == np.float32 and not a.any()
            for step in range(4):
                a[:] = A + step
                b[:] = B * (step + 1)
                answer = await client.infer(path, {"inputs": {"a": a, "b": b}}, model_type="generic")
                results.append((a.copy(), b.copy(), answer["result"]["outputs"]))
            status = await client.status()
            [mine] = [c for c in status["clients"] if c["shm_buffers"]]
            await client.free_shared_array(a)
            await client.free_shared_array(b)
            status = await client.status()
            assert not any(c["shm_buffers"] for c in status["clients"])
        return results, mine
    results, mine = run_async(main())
    assert mine["shm_buffers"] == 2 and mine["shm_buffer_bytes"] == 2 * mmap.PAGESIZE  # just the two arrays
    for a, b, outputs in results:
        assert_v1_outputs(fast_daemon, model_dir, a, b, outputs)


def test_shared_array_is_a_plain_array_without_registered_buffers(start_daemon, model_dir):
    daemon = start_daemon(shm_buffer_max_bytes=0, simulated={"infer_ms": 0, "load_ms": 0})

    async def main():
        async with AsyncClient(daemon.socket_path, timeout=30) as client:
            a = await client.shared_array((4, 4, 3))
            a[:] = A
            answer = await client.infer(str(model_dir / "two.hef"), {"inputs": {"a": a, "b": B}},
                                        model_type="generic")
            return answer["result"]["outputs"]
    got = run_async(main())
    assert_v1_outputs(daemon, model_dir, A, B, got)


def test_a_hugetlb_memfd_is_refused(fast_daemon, model_dir):
    """hugetlbfs reports no holes to SEEK_HOLE, so only plain memfds are taken."""
    raw = Raw(fast_daemon.socket_path, features=FEATURES)
    huge = os.memfd_create("huge", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | os.MFD_HUGETLB)
    answer = register(raw, huge)
    assert answer["code"] == p.BAD_REQUEST and "not a memfd" in answer["error"], answer
    raw.send({"action": "ping", "request_id": "after"})
    assert raw.read()["status"] == "ok"
    raw.close()


def test_requests_after_the_daemon_closed_the_connection_share_one_new_one(start_daemon, model_dir):
    """Several requests that find the v2 connection closed (idle_timeout_s) open
    one new connection between them, and shared arrays register on it."""
    daemon = start_daemon(idle_timeout_s=0.5, simulated={"infer_ms": 0, "load_ms": 0})

    async def main():
        async with AsyncClient(daemon.socket_path, transport="shm", timeout=10) as client:
            await client.ping()
            await asyncio.sleep(1.5)  # the daemon closes the idle connection
            answers = await asyncio.gather(*(client.ping() for _ in range(5)), return_exceptions=True)
            await asyncio.sleep(1.5)
            a = await client.shared_array((4, 4, 3))
            a[:] = A
            result = await client.infer(str(model_dir / "two.hef"), {"inputs": {"a": a, "b": B}},
                                        model_type="generic")
            status = await client.status()
            await client.free_shared_array(a)
            after = await client.status()
            return answers, result, status, after
    answers, result, status, after = run_async(main())
    assert all(isinstance(answer, dict) and answer["status"] == "ok" for answer in answers), answers
    assert result["status"] == "ok"
    [mine] = [c for c in status["clients"] if c["protocol"] == 2]
    assert mine["shm_buffers"] == 2  # the shared array, and a pool buffer for b
    assert [c["shm_buffers"] for c in after["clients"] if c["protocol"] == 2] == [1]


def test_a_registration_cancelled_midway_is_kept_not_lost():
    """The daemon may register a buffer whose caller was cancelled: the pool
    keeps it as idle, so its count stays the daemon's."""
    page = mmap.PAGESIZE
    release = asyncio.Event

    async def main():
        gate = release()

        async def slow_register(buffer):
            await gate.wait()
            return 7

        async def unregister_(buffer):
            pass
        pool = ClientBuffers(slow_register, unregister_, max_count=4, max_bytes=16 * page)
        preparing = asyncio.ensure_future(pool.prepare([np.zeros(page, np.uint8)], 1))
        await asyncio.sleep(0.01)
        preparing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await preparing
        gate.set()
        await asyncio.sleep(0.01)
        try:
            assert pool.placer("r", 1)(np.ones(page, np.uint8)) == {"buffer": 7, "offset": 0}
        finally:
            pool.close()
    run_async(main())


def test_concurrent_first_requests_wait_for_hello_and_never_cross(start_daemon, model_dir):
    """An AsyncClient not connected yet, or whose connection the daemon closed,
    gets bursts of requests at once: they all wait for one connect and its
    hello, so none goes out as v1 on a connection the daemon treats as v2
    (seen as 'answer for request 3 received for 4' on Python 3.13)."""
    daemon = start_daemon(idle_timeout_s=0.5, simulated={"infer_ms": 0, "load_ms": 0})
    path = str(model_dir / "two.hef")

    async def burst(client, size):
        return await asyncio.gather(*(client.infer(path, {"inputs": {"a": A, "b": B * index}}, "generic")
                                      for index in range(size)), return_exceptions=True)

    async def main():
        client = AsyncClient(daemon.socket_path, timeout=10)  # no connect(): the burst connects
        try:
            first = await burst(client, 10)
            await asyncio.sleep(1.2)  # the daemon closes the idle connection
            second = await burst(client, 10)
            one_by_one = [await client.infer(path, {"inputs": {"a": A, "b": B * index}}, "generic")
                          for index in range(10)]
            return first, second, one_by_one, client.protocol
        finally:
            await client.close()
    first, second, one_by_one, protocol = run_async(main())
    assert protocol == 2
    for answers in (first, second):
        assert all(isinstance(answer, dict) and answer["status"] == "ok" for answer in answers), answers
        for answer, alone in zip(answers, one_by_one):  # each request got its own answer
            assert np.array_equal(answer["result"]["outputs"]["sum"], alone["result"]["outputs"]["sum"])
    assert len({bytes(alone["result"]["outputs"]["sum"].tobytes()) for alone in one_by_one}) == 10


def test_registrations_cut_short_by_a_closing_connection_are_counted_once(start_daemon):
    """What a connection's registered buffers count for its uid goes back exactly
    once, whatever the worker was doing when the connection closed."""
    daemon = start_daemon()
    keeper = Raw(daemon.socket_path, features=FEATURES)
    assert register(keeper, sealed(64 * 1024, FUTURE))["status"] == "ok"
    for delay in (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04):
        quitter = Raw(daemon.socket_path, features=FEATURES)
        fd = sealed(32 << 20, FUTURE)      # large: the worker is still mapping it when the connection goes
        quitter.send({"action": "register_buffer", "fds": 1, "request_id": "r"}, fds=[fd])
        os.close(fd)
        time.sleep(delay)
        quitter.close()
    time.sleep(0.5)
    with Client(daemon.socket_path, timeout=10) as client:
        assert client.status()["held_by_clients"]["registered_shm_bytes"] == 64 * 1024
        keeper.close()
        time.sleep(0.5)
        assert client.status()["held_by_clients"]["registered_shm_bytes"] == 0
