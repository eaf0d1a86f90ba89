"""Protocol v2 frames by hand, for the transport tests: a raw connection,
memfds, counting the daemon's open descriptors, reading answers (through
the codec, wire/codec.py: tests parse no frame themselves) and a daemon
that speaks only v1."""
from __future__ import annotations

import array
import fcntl
import os
import socket
import tempfile
import threading
import time
import weakref


from hailo_devmgr.wire import codec
from hailo_devmgr.wire import protocol as p
from hailo_devmgr.wire import shm
from hailo_devmgr.wire import references as refs
from hailo_devmgr.client import Client
from hailo_devmgr.client.stream import read_frame_blocking, send_all

_readers: "weakref.WeakKeyDictionary[socket.socket, codec.FrameReader]" = weakref.WeakKeyDictionary()


def read_frame(sock: socket.socket) -> codec.Frame | None:
    """The next frame from a blocking socket (one reader per socket, so what it
    read ahead is kept); None when the peer closed between frames."""
    reader = _readers.get(sock)
    if reader is None:
        reader = _readers[sock] = codec.FrameReader(1 << 30)
    try:
        return read_frame_blocking(sock, reader)
    except ConnectionResetError:
        assert not reader.mid_frame, "closed in the middle of a frame"
        return None


def read_answer(sock: socket.socket) -> dict | None:
    """The next answer's JSON (its descriptors closed); None at a clean close."""
    frame = read_frame(sock)
    if frame is None:
        return None
    codec.close_fds(frame.fds)
    return frame.message


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
        frame = read_frame(self.sock)
        if frame is None:
            return None
        answer = frame.message
        assert not frame.fds  # these tests do not ask for shm results here
        if frame.attachments and "result" in answer:
            blocks = refs.Blocks(frame.attachments)
            answer["result"] = refs.resolve(answer["result"], blocks, 10 ** 9, as_array=True)
        return answer

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


class V1Peer:
    """A daemon that speaks only protocol v1, in front of a real one, at ``path``:
    ``hello`` gets what an older daemon answers (``"unknown_action"``: its v1
    error; ``"protocol 1"``: a hello answer naming protocol 1), everything else
    goes to ``upstream`` on a connection that never said hello, so anything
    but v1 is refused there. ``seen`` keeps every request as it came."""

    def __init__(self, path: str, upstream: str, hello: str = "unknown_action"):
        self.path, self.upstream, self.hello = path, upstream, hello
        self.seen: list[dict] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = codec.FrameReader(v2=False)   # attachments or descriptors: refused, closed
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        up.connect(self.upstream)
        try:
            while True:
                try:
                    frame = read_frame_blocking(conn, reader)
                except p.RequestError as error:
                    send_all(conn, [p.encode_frame(p.error_response(None, error))])
                    return
                message = frame.message
                self.seen.append(message)
                if message.get("action") == "hello" and self.hello == "unknown_action":
                    answer = {"error": "Unknown action: hello", "code": "unknown_action"}
                elif message.get("action") == "hello":
                    answer = {"status": "ok", "protocol": 1, "features": []}
                else:
                    send_all(up, [p.encode_frame(message)])
                    answer = read_answer(up)
                if "request_id" in message:
                    answer["request_id"] = message["request_id"]
                send_all(conn, [p.encode_frame(answer)])
        except OSError:
            pass
        finally:
            reader.close()
            conn.close()
            up.close()

    def close(self) -> None:
        self.listener.close()
