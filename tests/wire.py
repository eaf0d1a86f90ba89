"""Protocol v2 frames by hand, for the transport tests: a raw connection,
memfds, and counting the daemon's open descriptors."""
from __future__ import annotations

import array
import fcntl
import json
import os
import socket
import struct
import tempfile
import time

import numpy as np

from hailo_devmgr.wire import protocol as p
from hailo_devmgr.wire import shm
from hailo_devmgr.wire import references as refs
from hailo_devmgr.client import Client


def pipe_end() -> int:
    read_end, write_end = os.pipe()
    os.close(write_end)
    return read_end


def regular_file() -> int:
    with tempfile.TemporaryFile() as handle:
        return os.dup(handle.fileno())


def memfd(data: bytes, seals: int | None = shm.REQUIRED_SEALS | fcntl.F_SEAL_SEAL) -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seals is not None:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


class Raw:
    """Frames by hand, with attachments and descriptors."""

    def __init__(self, path: str, hello: bool = True, features=("attachments",)):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        if hello:
            self.send({"action": "hello", "protocol": 2, "request_id": "hello", "features": list(features)})
            answer = self.read()
            assert "attachments" in answer["features"] and "shm" in answer["features"]

    def send(self, message: dict, blocks=(), fds=()) -> None:
        data = b"".join([p.encode_frame(message), *(bytes(memoryview(b).cast("B")) for b in blocks)])
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sent = self.sock.sendmsg([data], ancillary)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def read(self) -> dict | None:
        """The next answer (attachment/shm results resolved); None at a clean close."""
        header = self._exactly(4)
        if header is None:
            return None
        (length,) = struct.unpack(">I", header)
        answer = json.loads(self._exactly(length))
        blocks = [np.frombuffer(self._exactly(n), np.uint8) for n in answer.get("attachments", [])]
        assert "fds" not in answer  # these tests do not ask for shm results here
        if blocks and "result" in answer:
            answer["result"] = refs.resolve(answer["result"], refs.Blocks(blocks), 10 ** 9, as_array=True)
        return answer

    def _exactly(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            try:
                chunk = self.sock.recv(size - len(data))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                assert not data, "closed in the middle of a frame"
                return None
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def infer_message(model_dir, inputs: dict, request_id="r", **fields) -> dict:
    return {"action": "infer", "model_type": "generic", "model_path": str(model_dir / "two.hef"),
            "input_data": {"inputs": inputs}, "request_id": request_id, **fields}


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(pid: int) -> int:
    """The daemon's open descriptors once connections that just ended are closed."""
    seen = [open_fds(pid)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (len(seen) < 3 or len(set(seen[-3:])) > 1):
        time.sleep(0.05)
        seen.append(open_fds(pid))
    return seen[-1]


def assert_no_leak(pid: int, before: int) -> None:
    deadline = time.monotonic() + 10
    while open_fds(pid) > before and time.monotonic() < deadline:
        time.sleep(0.05)  # a connection the client just closed may not be closed yet
    after = open_fds(pid)
    targets = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets[name] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    assert after <= before, f"{after - before} descriptor(s) leaked: {targets}"


def shared_mappings(pid: int) -> list[str]:
    """The daemon's mappings of memfds (one-shot tensors, registered buffers)."""
    with open(f"/proc/{pid}/maps") as maps:
        return [line.strip() for line in maps if "/memfd:" in line]


def assert_no_mapping_left(pid: int) -> None:
    """Once its clients are gone, the daemon maps no client memory."""
    deadline = time.monotonic() + 10
    while shared_mappings(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert shared_mappings(pid) == []


def ping_ok(daemon) -> None:
    with Client(daemon.socket_path, timeout=10) as client:
        assert client.ping()["status"] == "ok"
