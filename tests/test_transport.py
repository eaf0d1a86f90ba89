"""Protocol v2 fast tensor transport: binary attachments and shared memory (memfd).

Pure parts (packing, references, memfd checks) first, then a real daemon on
the simulated backend: every transport gives the same results as v1, every
kind of bad input is a clear error that leaves other clients alone, and no
file descriptor is ever leaked (counted in /proc/<pid>/fd).
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket

import numpy as np
import pytest

from hailo_devmgr.client.stream import SocketStream, read_frame
from hailo_devmgr.daemon.attachment_buffers import BufferPool
from hailo_devmgr.wire import codec
from hailo_devmgr.wire import protocol as p
from hailo_devmgr.wire import shm
from hailo_devmgr.wire import references as refs
from hailo_devmgr.wire import transport as t
from hailo_devmgr.client import AsyncClient, Client, DeviceError
from hailo_devmgr.wire.tensors import DecodedTensor, decode_v1
from hailo_devmgr.client import library
from hailo_devmgr.client.buffers import WritableBuffer
from wire import (Raw, V1Peer, assert_no_leak, assert_no_mapping_left, infer_message, memfd, pipe_end, ping_ok,
                  regular_file, settled_fds)

A = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
B = np.linspace(0, 1, 8, dtype=np.float32)


# ---------------------------------------------------------------- pure parts

def test_pack_then_resolve_gives_the_same_arrays():
    message = {"action": "infer", "input_data": {"inputs": {"a": A, "b": B, "s": np.float32(2.5)}}}
    frame, buffers, fds = t.pack(message, shm_min_bytes=None)
    assert fds == []
    reader = codec.FrameReader(decode=False)
    reader.feed(frame)
    assert reader.next_event() == codec.Header(len(frame) - 4)
    header = json.loads(frame[4:])
    assert header["attachments"] == [48, 32]
    assert header["input_data"]["inputs"]["a"] == {"dtype": "uint8", "shape": [4, 4, 3], "attachment": 0}
    assert header["input_data"]["inputs"]["s"] == 2.5
    blocks = refs.Blocks([np.frombuffer(bytes(memoryview(b).cast("B")), np.uint8) for b in buffers])
    resolved = refs.resolve(header["input_data"], blocks, 1000, "input_data")
    assert isinstance(resolved["inputs"]["a"], DecodedTensor)
    assert np.array_equal(decode_v1(resolved["inputs"]["a"]), A)
    assert np.array_equal(decode_v1(resolved["inputs"]["b"]), B)


def test_shared_memory_round_trip_and_fds_closed():
    frame, buffers, fds = t.pack({"x": A}, shm_min_bytes=1)
    assert buffers == [] and len(fds) == 1
    header = json.loads(frame[4:])
    assert header["fds"] == 1 and header["x"] == {"dtype": "uint8", "shape": [4, 4, 3], "shm": 0, "offset": 0}
    seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
    assert seals & shm.REQUIRED_SEALS == shm.REQUIRED_SEALS and seals & fcntl.F_SEAL_SEAL
    blocks = refs.Blocks([], fds)
    out = refs.resolve(header["x"], blocks, 1000, as_array=True)
    blocks.close()
    assert fds == []  # closed
    assert np.array_equal(out, A) and not out.flags.writeable


def test_zero_dimensional_and_non_contiguous_arrays_keep_their_shape():
    frame, buffers, _ = t.pack({"x": np.array(1.0, np.float32), "y": A[:, ::2]}, shm_min_bytes=None)
    header = json.loads(frame[4:])
    assert header["x"]["shape"] == [] and header["y"]["shape"] == [4, 2, 3]
    blocks = refs.Blocks([np.frombuffer(bytes(memoryview(b).cast("B")), np.uint8) for b in buffers])
    assert np.array_equal(refs.resolve(header["y"], blocks, 100, as_array=True), A[:, ::2])


@pytest.mark.parametrize("ref, message", [
    ({"dtype": "uint8", "shape": [4, 4, 3], "attachment": 1}, "attachment 1 does not exist"),
    ({"dtype": "uint8", "shape": [4, 4, 4], "attachment": 0}, "has 48 bytes but dtype uint8"),
    ({"dtype": "float32", "shape": [4, 4, 3], "attachment": 0}, "need 192"),
    ({"dtype": "object", "shape": [1], "attachment": 0}, "dtype must be one of"),
    ({"shape": [1], "attachment": 0}, "must include dtype and shape"),
    ({"dtype": "uint8", "shape": [1], "shm": 0}, "shm 0 does not exist"),
    ({"dtype": "uint8", "shape": [0, 2 ** 70], "attachment": 0}, "shape"),
])
def test_bad_references_are_bad_requests(ref, message):
    blocks = refs.Blocks([np.zeros(48, np.uint8)])
    with pytest.raises(p.RequestError) as error:
        refs.resolve({"x": ref}, blocks, 10 ** 6, "input_data")
    assert error.value.code == p.BAD_REQUEST and message in error.value.message
    assert error.value.message.startswith("input_data.x: ")


@pytest.mark.parametrize("make, message", [
    (lambda: memfd(b"x" * 48, seals=None), "must be sealed"),
    (lambda: memfd(b"x" * 48, seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW), "must be sealed"),
    (lambda: memfd(b"x" * 10), "too small"),
    (regular_file, "is not a memfd"),
    (pipe_end, "is not a memfd"),
])
def test_bad_shared_memory_is_refused(make, message):
    fd = make()
    blocks = refs.Blocks([], [fd])
    try:
        with pytest.raises(p.RequestError) as error:
            refs.resolve({"dtype": "uint8", "shape": [48], "shm": 0}, blocks, 1000)
        assert message in error.value.message
    finally:
        blocks.close()


def test_socket_stream_and_codec_pass_fds_and_read_attachments_into_their_buffers():
    """A v2 frame (JSON, a 300 kB attachment, a memfd) through a real socket:
    the attachment lands in the buffer the reader allocated, the descriptor
    with its frame; the end of the stream is an IncompleteReadError."""
    async def main():
        left, right = socket.socketpair()
        a, b = SocketStream(left), SocketStream(right)
        fd = memfd(b"abc")
        payload = np.arange(300_000, dtype=np.uint8)
        buffers, _ = codec.encode({"action": "infer", "input_data": {"x": payload}, "fds": 1})
        given = []
        reader = codec.FrameReader(allocate=lambda size: given.append(np.empty(size, np.uint8)) or given[-1])
        sending = asyncio.ensure_future(a.send(buffers, [fd]))
        frame = await read_frame(b, reader)
        await sending
        assert frame.message["fds"] == 1 and len(frame.fds) == 1
        assert frame.attachments[0] is given[0] and np.array_equal(frame.attachments[0], payload)
        assert os.pread(frame.fds[0], 3, 0) == b"abc"
        codec.close_fds(frame.fds)
        os.close(fd)
        a.close()
        with pytest.raises(asyncio.IncompleteReadError):
            await read_frame(b, reader)
        b.close()
    asyncio.run(main())


def test_descriptors_that_come_for_a_closed_reader_are_closed():
    """A socket still watched after its reader was closed (a connection being
    cut while an answer is written): what arrives, descriptors too, is
    dropped, not kept open by nobody."""
    async def main():
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stream, reader = SocketStream(left), codec.FrameReader()
        right.sendall(p.encode_frame({"action": "ping"}))
        await read_frame(stream, reader)      # the stream now watches for this reader
        reader.close()
        before = len(os.listdir("/proc/self/fd"))
        sent = memfd(b"x" * 64)
        socket.send_fds(right, [b"y"], [sent])
        os.close(sent)
        await asyncio.sleep(0.1)              # the readable callback runs, nobody waiting
        assert len(os.listdir("/proc/self/fd")) == before
        stream.close()
        right.close()
    run_async(main())


def test_frames_read_in_one_go_keep_their_own_descriptors():
    """Small frames sent back to back arrive in one read-ahead; the memfd
    sent with a frame goes to that frame, never to the one before."""
    async def main():
        left, right = socket.socketpair()
        a, b = SocketStream(left), SocketStream(right)
        second, third = memfd(b"two"), memfd(b"three")
        await a.send([p.encode_frame({"n": 1})])
        await a.send([p.encode_frame({"n": 2, "fds": 1})], [second])
        await a.send([p.encode_frame({"n": 3, "fds": 1})], [third])
        reader, seen = codec.FrameReader(), []
        for _ in range(3):
            frame = await read_frame(b, reader)
            seen.append((frame.message["n"], [os.pread(fd, 5, 0) for fd in frame.fds]))
            codec.close_fds(frame.fds)
        assert seen == [(1, []), (2, [b"two"]), (3, [b"three"])]
        for fd in (second, third):
            os.close(fd)
        a.close()
        b.close()
    asyncio.run(main())


# ---------------------------------------------------------------- against the daemon

@pytest.fixture
def fast_daemon(start_daemon):
    return start_daemon(simulated={"infer_ms": 0, "load_ms": 0}, shm_result_min_bytes=16)


def run_async(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_hello_lists_the_transport_features_and_v1_is_unchanged(fast_daemon, model_dir):
    raw = Raw(fast_daemon.socket_path, hello=False)
    raw.send({"action": "hello", "protocol": 2, "request_id": 1, "features": ["attachments"]})
    answer = raw.read()
    assert {"attachments", "shm"} <= set(answer["features"])
    assert answer["transport"] == {"version": 2, "results": "attachments"}
    assert answer["limits"]["max_fds"] == t.MAX_FDS and answer["limits"]["shm_result_min_bytes"] == 16
    raw.close()
    with Client(fast_daemon.socket_path, timeout=10) as client:  # v1: base64 in, base64 out
        result = client.infer(str(model_dir / "two.hef"), {"inputs": {"a": A, "b": B}},
                              model_type="generic", decode=False)["result"]
        assert "data_b64" in result["outputs"]["sum"]


@pytest.mark.parametrize("mode", ["attachments", "shm", "auto"])
def test_every_transport_gives_the_v1_results(fast_daemon, model_dir, mode):
    path = str(model_dir / "two.hef")

    async def main():
        async with AsyncClient(fast_daemon.socket_path, transport="base64", timeout=30) as client:
            expected = (await client.infer(path, {"inputs": {"a": A, "b": B}}, model_type="generic"))["result"]
        async with AsyncClient(fast_daemon.socket_path, transport=mode, shm_min_bytes=40, timeout=30) as client:
            assert client.protocol == 2 and "attachments" in client.features
            got = await asyncio.gather(*(client.infer(path, {"inputs": {"a": A, "b": B}}, model_type="generic")
                                         for _ in range(20)))
        for answer in got:
            for name, value in expected["outputs"].items():
                assert isinstance(answer["result"]["outputs"][name], np.ndarray)
                assert np.array_equal(answer["result"]["outputs"][name], value)
    run_async(main())


def test_v1_connection_sending_attachments_is_refused_and_closed(fast_daemon, model_dir):
    raw = Raw(fast_daemon.socket_path, hello=False)
    message = infer_message(model_dir, {"a": {"dtype": "uint8", "shape": [4, 4, 3], "attachment": 0}},
                            attachments=[48])
    raw.send(message, [A])
    answer = raw.read()
    assert answer["code"] == p.BAD_REQUEST and "protocol 2" in answer["error"] and answer["request_id"] == "r"
    assert raw.read() is None  # closed
    ping_ok(fast_daemon)


def test_v1_connection_sending_fds_is_refused_and_fds_closed(fast_daemon):
    pid = fast_daemon.process.pid
    ping_ok(fast_daemon)
    before = settled_fds(pid)
    send_fds_on_v1(fast_daemon, 20)
    ping_ok(fast_daemon)
    assert_no_leak(pid, before)


def send_fds_on_v1(daemon, count: int) -> None:
    for _ in range(count):
        raw = Raw(daemon.socket_path, hello=False)
        fd = memfd(A.tobytes())
        raw.send({"action": "ping", "request_id": 1}, fds=[fd])
        os.close(fd)
        answer = raw.read()
        assert answer["code"] == p.BAD_REQUEST and "File descriptors need protocol 2" in answer["error"]
        assert raw.read() is None
        raw.close()


def bad_frames(model_dir):
    """(blocks, fds factory, message, error text) sent on a v2 connection that stays usable."""
    ref = {"dtype": "uint8", "shape": [4, 4, 3]}
    shm_ref = {**ref, "shm": 0, "offset": 0}
    return [
        ([A], None, infer_message(model_dir, {"a": {**ref, "attachment": 1}}, attachments=[48]),
         "attachment 1 does not exist"),
        ([A, A], None, infer_message(model_dir, {"a": {**ref, "attachment": 0}}, attachments=[48, 48]), None),
        ([A[:2]], None, infer_message(model_dir, {"a": {**ref, "attachment": 0}}, attachments=[24]),
         "has 24 bytes but"),
        ([], lambda: [memfd(A.tobytes()), memfd(A.tobytes())],
         infer_message(model_dir, {"a": shm_ref}, fds=1), "declares fds: 1 but 2"),
        ([], lambda: [memfd(A.tobytes())], infer_message(model_dir, {"a": shm_ref}), "declares fds: 0 but 1"),
        ([], None, infer_message(model_dir, {"a": shm_ref}, fds=1), "declares fds: 1 but 0"),
        ([], lambda: [memfd(A.tobytes()) for _ in range(t.MAX_FDS + 1)],
         infer_message(model_dir, {"a": shm_ref}, fds=t.MAX_FDS), f"More than {t.MAX_FDS} file descriptors"),
        ([], lambda: [memfd(A.tobytes()[:10])], infer_message(model_dir, {"a": shm_ref}, fds=1), "too small"),
        ([], lambda: [memfd(A.tobytes(), seals=None)], infer_message(model_dir, {"a": shm_ref}, fds=1),
         "must be sealed"),
        ([], lambda: [memfd(A.tobytes(), seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)],
         infer_message(model_dir, {"a": shm_ref}, fds=1), "F_SEAL_WRITE"),
        ([], lambda: [pipe_end()], infer_message(model_dir, {"a": shm_ref}, fds=1), "not a memfd"),
        ([], lambda: [os.open(str(model_dir / "two.hef"), os.O_RDONLY)],
         infer_message(model_dir, {"a": shm_ref}, fds=1), "not a memfd"),
        ([], None, infer_message(model_dir, {"a": {**shm_ref, "offset": 3, "dtype": "float32", "shape": [1]}},
                                 fds=0), "offset must be"),
    ]


def send_bad_batch(daemon, model_dir) -> None:
    raw = Raw(daemon.socket_path)
    for blocks, make_fds, message, text in bad_frames(model_dir):
        fds = make_fds() if make_fds else []
        raw.send(message, blocks, fds)
        t.close_fds(fds)
        answer = raw.read()
        if text is None:  # an unused extra attachment is fine, but b is missing
            assert answer["code"] == p.BAD_REQUEST
        else:
            assert answer["code"] == p.BAD_REQUEST and text in answer["error"], answer
        assert answer["request_id"] == "r"
    # Still usable: a good request with an attachment.
    raw.send(infer_message(model_dir, {"a": {"dtype": "uint8", "shape": [4, 4, 3], "attachment": 0},
                                       "b": {"dtype": "float32", "shape": [8], "attachment": 1}},
                           attachments=[48, 32]), [A, B])
    answer = raw.read()
    assert answer["status"] == "ok", answer
    assert isinstance(answer["result"]["outputs"]["sum"], np.ndarray)
    raw.close()


def test_bad_attachments_and_fds_are_clear_errors_and_the_connection_stays_usable(fast_daemon, model_dir):
    send_bad_batch(fast_daemon, model_dir)
    ping_ok(fast_daemon)


@pytest.mark.parametrize("sizes", [[-1], "48", [True], list(range(t.MAX_ATTACHMENTS + 1))])
def test_malformed_attachment_lists_close_the_connection(fast_daemon, model_dir, sizes):
    raw = Raw(fast_daemon.socket_path)
    raw.send(infer_message(model_dir, {}, attachments=sizes))
    answer = raw.read()
    assert answer["code"] == p.BAD_REQUEST and "attachments must be" in answer["error"]
    assert raw.read() is None
    ping_ok(fast_daemon)


def test_attachments_count_against_max_message_bytes(start_daemon, model_dir):
    daemon = start_daemon(max_message_bytes=4096, max_pending_bytes=8192)
    raw = Raw(daemon.socket_path)
    raw.send(infer_message(model_dir, {"a": {"dtype": "uint8", "shape": [5000], "attachment": 0}},
                           attachments=[5000]))
    answer = raw.read()
    assert answer["code"] == p.TOO_LARGE and answer["request_id"] == "r"
    assert raw.read() is None
    ping_ok(daemon)


def test_no_descriptor_leaks_after_1000_requests_and_bad_ones(fast_daemon, model_dir):
    pid = fast_daemon.process.pid
    path = str(model_dir / "two.hef")
    ping_ok(fast_daemon)

    async def requests(mode, count, **settings):
        async with AsyncClient(fast_daemon.socket_path, transport=mode, timeout=60, **settings) as client:
            for start in range(0, count, 50):
                answers = await asyncio.gather(*(client.infer(path, {"inputs": {"a": A, "b": B}},
                                                              model_type="generic")
                                                 for _ in range(min(50, count - start))))
                assert all(isinstance(a["result"]["outputs"]["map"], np.ndarray) for a in answers)

    run_async(requests("shm", 10))  # load the model, warm up threads
    before = settled_fds(pid)
    run_async(requests("shm", 1000, shm_buffers=False))   # a one-shot memfd per array
    run_async(requests("shm", 1000))                      # registered buffers, reused
    run_async(requests("attachments", 100))
    send_bad_batch(fast_daemon, model_dir)
    send_fds_on_v1(fast_daemon, 20)
    # A client that vanishes with descriptors in flight.
    raw = Raw(fast_daemon.socket_path)
    raw.send(infer_message(model_dir, {"a": {"dtype": "uint8", "shape": [4, 4, 3], "shm": 0}}, fds=1),
             fds=[memfd(A.tobytes())])
    raw.close()
    # And one that vanishes with a buffer registered (and a registration on its way).
    raw = Raw(fast_daemon.socket_path, features=("attachments", "shm", "shm_buffers"))
    for request_id in ("kept", "in flight"):
        buffer = WritableBuffer(4096)
        fd = buffer.take_fd()
        raw.send({"action": "register_buffer", "request_id": request_id, "fds": 1}, fds=[fd])
        os.close(fd)
        buffer.close()
        if request_id == "kept":
            assert raw.read()["status"] == "ok"
    raw.close()
    ping_ok(fast_daemon)
    assert_no_leak(pid, before)
    assert_no_mapping_left(pid)


def test_async_client_against_a_v1_only_peer_sends_base64(fast_daemon, model_dir):
    async def main():
        async with AsyncClient(fast_daemon.socket_path, pipelining=False, timeout=30) as client:
            assert client.protocol == 1
            answer = await client.infer(str(model_dir / "two.hef"), {"inputs": {"a": A, "b": B}},
                                        model_type="generic")
            assert isinstance(answer["result"]["outputs"]["sum"], np.ndarray)
    run_async(main())


class _Spy:
    """What the blocking Client sends and receives: buffers per frame, attachments per answer."""

    def __init__(self, monkeypatch):
        self.sent, self.received = [], []
        send_all, read_frame = library.send_all, library.read_frame_blocking

        def sending(sock, buffers, fds=()):
            self.sent.append((len(buffers), len(fds)))
            return send_all(sock, buffers, fds)

        def reading(sock, reader):
            frame = read_frame(sock, reader)
            self.received.append((len(frame.attachments), len(frame.fds)))
            return frame
        monkeypatch.setattr(library, "send_all", sending)
        monkeypatch.setattr(library, "read_frame_blocking", reading)


def test_the_blocking_client_speaks_v2_with_attachments(fast_daemon, model_dir, monkeypatch):
    path = str(model_dir / "two.hef")
    with Client(fast_daemon.socket_path, timeout=30, transport="base64") as client:
        assert client.protocol == 1
        expected = client.infer(path, {"inputs": {"a": A, "b": B}}, model_type="generic")["result"]
        raw = client.infer(path, {"inputs": {"a": A, "b": B}}, model_type="generic", decode=False)["result"]
    spy = _Spy(monkeypatch)
    with Client(fast_daemon.socket_path, timeout=30, client_name="blocking-v2") as client:
        assert client.protocol == 2 and client.features == {"attachments", "shm"}
        del spy.sent[:], spy.received[:]
        answer = client.infer(path, {"inputs": {"a": A, "b": B}}, model_type="generic")
        assert spy.sent == [(3, 0)] and spy.received == [(2, 0)]   # header+JSON, a, b; sum and map back
        for name, value in expected["outputs"].items():
            got = answer["result"]["outputs"][name]
            assert isinstance(got, np.ndarray) and got.dtype == value.dtype and np.array_equal(got, value)
        # decode=False: v1 tensors, as a v1 client gets them
        assert client.infer(path, {"inputs": {"a": A, "b": B}}, model_type="generic", decode=False)["result"] == raw
        mine = [entry for entry in client.status()["clients"] if entry["client"] == "blocking-v2"]
        assert [entry["protocol"] for entry in mine] == [2]


def test_the_blocking_client_sends_large_arrays_in_shared_memory(fast_daemon, model_dir, monkeypatch):
    path = str(model_dir / "two.hef")
    with Client(fast_daemon.socket_path, timeout=30) as client:
        client.load_model(path, "generic")   # the daemon keeps the model's file open
    before = settled_fds(fast_daemon.process.pid)
    spy = _Spy(monkeypatch)
    with Client(fast_daemon.socket_path, timeout=30, shm_min_bytes=40) as client:   # a: 48 bytes, b: 32
        result = client.infer(path, {"inputs": {"a": A, "b": B}}, model_type="generic")["result"]
        assert spy.sent[-1] == (2, 1)   # b attached, a in a memfd
    with Client(fast_daemon.socket_path, timeout=30, transport="shm") as client:
        assert client.features == {"attachments", "shm"}
        again = client.infer(path, {"inputs": {"a": A, "b": B}}, model_type="generic")["result"]
        assert spy.sent[-1] == (1, 2) and spy.received[-1][1] >= 1   # both in memfds; results in memfds
    for name in ("sum", "map"):
        assert np.array_equal(result["outputs"][name], again["outputs"][name])
    assert_no_leak(fast_daemon.process.pid, before)


@pytest.mark.parametrize("hello", ["unknown_action", "protocol 1"])
def test_the_blocking_client_falls_back_to_v1_against_a_v1_only_peer(fast_daemon, model_dir, tmp_path, hello):
    peer = V1Peer(str(tmp_path / "v1.sock"), fast_daemon.socket_path, hello=hello)
    path = str(model_dir / "two.hef")
    try:
        with Client(peer.path, timeout=30) as client:
            assert client.protocol == 1 and client.features == frozenset()
            answer = client.infer(path, {"inputs": {"a": A, "b": B}}, model_type="generic")
            assert isinstance(answer["result"]["outputs"]["sum"], np.ndarray)
            assert client.ping()["status"] == "ok"
        with Client(fast_daemon.socket_path, timeout=30) as client:
            direct = client.infer(path, {"inputs": {"a": A, "b": B}}, model_type="generic")
        assert np.array_equal(answer["result"]["outputs"]["sum"], direct["result"]["outputs"]["sum"])
        sent = [message for message in peer.seen if message["action"] == "infer"]
        assert len(sent) == 1 and "attachments" not in sent[0]
        assert "data_b64" in sent[0]["input_data"]["inputs"]["a"]
    finally:
        peer.close()


def test_the_async_client_falls_back_to_v1_against_a_v1_only_peer(fast_daemon, model_dir, tmp_path):
    peer = V1Peer(str(tmp_path / "v1.sock"), fast_daemon.socket_path)

    async def main():
        async with AsyncClient(peer.path, timeout=30) as client:
            assert client.protocol == 1
            answer = await client.infer(str(model_dir / "two.hef"), {"inputs": {"a": A, "b": B}},
                                        model_type="generic")
            assert isinstance(answer["result"]["outputs"]["sum"], np.ndarray)
    try:
        run_async(main())
    finally:
        peer.close()


def test_errors_still_raise_device_errors(fast_daemon, model_dir):
    async def main():
        async with AsyncClient(fast_daemon.socket_path, timeout=30) as client:
            with pytest.raises(DeviceError) as error:
                await client.infer(str(model_dir / "two.hef"), {"inputs": {"a": A[:2], "b": B}},
                                   model_type="generic")
            assert error.value.code == p.BAD_REQUEST
    run_async(main())


def test_buffer_pool_never_hands_out_memory_still_in_use():
    pool = BufferPool(64 * 1024 * 1024)
    size = 256 * 1024
    blocks = [pool.get(size)]
    in_use = np.frombuffer(memoryview(blocks[0]).cast("B"), np.uint8)  # an array over it, as a tensor is
    pool.put(blocks.pop())
    other = pool.get(size)
    assert not np.shares_memory(other, in_use)  # still referred to: a new buffer
    base = in_use.base.obj
    del in_use
    pool.put(other)
    del other
    again = pool.get(size)
    assert again is base or again.size == size  # free again: reused
    assert pool.get(10).size == 10  # small sizes are never pooled


# ---------------------------------------------------------------- references: bounds and one mapping per memfd

def test_references_past_the_count_or_byte_bound_are_refused_before_any_mapping():
    """Checked from dtype and shape alone: the descriptor is never even looked at."""
    ref = {"dtype": "uint8", "shape": [1 << 20], "shm": 0}
    blocks = refs.Blocks([], [-1])  # mapping it would fail with EBADF
    with pytest.raises(p.RequestError) as many:
        refs.resolve({"x": [ref] * 300}, blocks, 1 << 30, "input_data", max_count=256, max_bytes=1 << 40)
    with pytest.raises(p.RequestError) as large:
        refs.resolve({"x": [ref] * 100}, blocks, 1 << 30, "input_data", max_count=256, max_bytes=64 << 20)
    assert many.value.code == large.value.code == p.TOO_LARGE
    assert "more than 256 tensor references" in many.value.message
    assert "104857600 bytes" in large.value.message and "67108864" in large.value.message


def test_many_references_to_one_memfd_share_one_mapping():
    data = np.arange(1 << 20, dtype=np.uint8)
    fd = memfd(data.tobytes())
    blocks = refs.Blocks([], [fd])
    name = "/memfd:test"
    before = sum(name in line for line in open("/proc/self/maps"))
    many = [{"dtype": "uint8", "shape": [1 << 20], "shm": 0}] * 50 + \
           [{"dtype": "uint8", "shape": [16], "shm": 0, "offset": 4096}]
    out = refs.resolve(many, blocks, 1 << 30, as_array=True)
    blocks.close()
    assert sum(name in line for line in open("/proc/self/maps")) - before == 1
    assert all(np.array_equal(array_, data) for array_ in out[:50])
    assert np.array_equal(out[50], data[4096:4112])


def test_references_far_apart_map_only_the_pages_they_use():
    """Two small tensors 512 MiB apart in a sparse memfd: one mapping spans them,
    the gap (never written) is never touched, so it costs no memory."""
    fd = os.memfd_create("far", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, (512 << 20) + 4096)
    os.pwrite(fd, A.tobytes(), 0)
    os.pwrite(fd, B.tobytes(), 512 << 20)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, shm.REQUIRED_SEALS)
    kept = os.dup(fd)
    blocks = refs.Blocks([], [fd])
    out = refs.resolve({"a": {"dtype": "uint8", "shape": [4, 4, 3], "shm": 0},
                        "b": {"dtype": "float32", "shape": [8], "shm": 0, "offset": 512 << 20}},
                       blocks, 1000, as_array=True)
    blocks.close()
    assert np.array_equal(out["a"], A) and np.array_equal(out["b"], B)
    assert os.fstat(kept).st_blocks * 512 <= 64 * 1024  # two pages written, no hole filled
    os.close(kept)
