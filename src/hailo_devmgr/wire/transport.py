"""Protocol v2 fast tensor transport: binary attachments and shared memory.

Shared by the daemon and the client library (see docs/protocol.md,
"Protocol v2: binary attachments and shared memory"). A v2 frame is a v1
frame (4-byte big-endian length, then that many bytes of JSON) followed by
the raw blocks its JSON lists in ``"attachments": [n0, n1, ...]``, back to
back; file descriptors (sealed memfds) ride in the same ``sendmsg`` as the
frame's first byte, as ``SCM_RIGHTS``, and the JSON counts them in
``"fds": N``. A tensor refers to a block by index::

    {"dtype": "uint8", "shape": [h, w, 3], "attachment": 0}
    {"dtype": "uint8", "shape": [h, w, 3], "shm": 0, "offset": 0}

Rules of this module:
- :class:`SocketStream` is the only thing that touches the socket: reads
  into the caller's buffers (``recvmsg_into``) and gathered writes
  (``sendmsg``), on the event loop with ``add_reader``/``add_writer``. A
  short read may take up to READ_AHEAD bytes more than asked (a small
  frame's header and body in one system call), kept for the next read.
  Descriptors are tagged with the stream position where the read that
  brought them ended (the kernel ends a read with the message that carries
  them), and ``take_fds`` hands over only those whose message has been read,
  so the descriptors of the next frame stay with the next frame.
- Every descriptor it receives is in ``fds`` until taken; whoever takes
  descriptors closes them (``close_fds``) on every path.
- The rest (frame metadata checks, packing) is pure; references.py resolves
  tensor references. Both raise :class:`~hailo_devmgr.wire.protocol.RequestError`.
"""
from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import socket
import sys
import threading

import numpy as np

from . import protocol as p
from . import shm
from .protocol import BAD_REQUEST, RequestError

TRANSPORT_VERSION = 2          # of the attachment/shm encoding (hello answers it; 2: registered buffers)
MAX_ATTACHMENTS = 256          # blocks after one frame's JSON
MAX_FDS = 16                   # descriptors with one frame
DEFAULT_SHM_MIN_BYTES = 1024 * 1024   # the client's default threshold for shared memory
CLIENT_SEND_BUFFER = 4 * 1024 * 1024   # SO_SNDBUF the client asks for (requests carry the bulk)
_ATTACHMENTS_KEY = b'"attachments"'
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_MAX_IOV = 512
# A read shorter than this takes this much (what has arrived of it): one system
# call for a small frame's header and body. What is read past the frame waits
# in the stream, at most this much per connection.
READ_AHEAD = 16 * 1024
_scratch = threading.local()   # one read-ahead buffer per thread (event loops run in threads)


def _read_ahead_buffer() -> memoryview:
    view = getattr(_scratch, "view", None)
    if view is None:
        view = _scratch.view = memoryview(bytearray(READ_AHEAD))
    return view


def close_fds(fds) -> None:
    """Close every descriptor in ``fds`` (a list, emptied)."""
    while fds:
        fd = fds.pop()
        try:
            os.close(fd)
        except OSError:
            pass


# ---------------------------------------------------------------- the socket

class SocketStream:
    """Exact reads and gathered writes on a non-blocking stream socket, with
    descriptor passing. One reader and one writer at a time."""

    def __init__(self, sock: socket.socket, send_buffer: int | None = None):
        sock.setblocking(False)
        if send_buffer:
            # A Unix stream socket has at most SO_SNDBUF bytes in flight (208 KiB by
            # default): a 6 MB frame then takes ~60 wake-ups of both event loops.
            # The kernel caps the value at net.core.wmem_max; best effort.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        self.sock = sock
        self.fds: list[int] = []       # received, not yet taken
        self._fd_ends: list[int] = []  # per descriptor: the stream position its read ended at
        self.fds_truncated = False     # the kernel dropped some (more than MAX_FDS at once)
        self._received = 0             # bytes read from the socket
        self._delivered = 0            # bytes handed to readers
        self._ahead = memoryview(b"")  # read past what was asked, not yet handed over
        self.closed = False
        self._fileno = sock.fileno()
        self._waiting: set[asyncio.Future] = set()   # a reader's and a writer's, failed by close
        # Asked before descriptors are kept (the daemon charges them to the peer's uid).
        self.admit_fds = None

    async def _wait(self, writing: bool) -> None:
        if self.closed:
            raise ConnectionResetError("the connection was closed")
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def wake():
            if not ready.done():
                ready.set_result(None)
        (loop.add_writer if writing else loop.add_reader)(self._fileno, wake)
        self._waiting.add(ready)
        try:
            await ready
        finally:
            self._waiting.discard(ready)
            if not self.closed:
                (loop.remove_writer if writing else loop.remove_reader)(self._fileno)

    async def wait_readable(self) -> None:
        if not self._ahead:
            await self._wait(False)

    def _recv(self, view: memoryview) -> int:
        count, ancillary, flags, _ = self.sock.recvmsg_into([view], _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
        self._received += count
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                self._keep_fds(list(fds))
        if flags & socket.MSG_CTRUNC:
            self.fds_truncated = True
        return count

    def _keep_fds(self, fds: list[int]) -> None:
        """Keep at most MAX_FDS until taken; close the rest at once. A frame's
        body may come in many reads, each with its own descriptors: counting
        only at the frame's end let one frame hold every descriptor the
        daemon may open."""
        room = max(0, MAX_FDS - len(self.fds))
        keep, extra = fds[:room], fds[room:]
        if keep and self.admit_fds is not None and not self.admit_fds(len(keep)):
            keep, extra = [], fds   # the owner's bound: closed at once as well
        self.fds.extend(keep)
        self._fd_ends.extend([self._received] * len(keep))
        if extra:
            self.fds_truncated = True
            close_fds(extra)

    async def readinto(self, view: memoryview) -> None:
        """Fill ``view`` exactly; IncompleteReadError at end of stream."""
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        size = len(view)
        done = self._take_ahead(view)
        while done < size:
            try:
                count = self._recv_into(view, done)
            except (BlockingIOError, InterruptedError):
                await self._wait(False)
                continue
            if count == 0:
                raise asyncio.IncompleteReadError(bytes(view[:done]), size)
            done += count
        self._delivered += size

    def _take_ahead(self, view: memoryview) -> int:
        """Copy what was read ahead into ``view``; how many bytes."""
        count = min(len(self._ahead), len(view))
        if count:
            view[:count] = self._ahead[:count]
            self._ahead = self._ahead[count:]
        return count

    def _recv_into(self, view: memoryview, done: int) -> int:
        """One read for ``view[done:]``: straight into it when large, else through
        the read-ahead buffer, keeping what came past it. Returns the bytes of
        ``view`` filled (0: end of stream)."""
        wanted = len(view) - done
        if wanted >= READ_AHEAD:
            return self._recv(view[done:])
        scratch = _read_ahead_buffer()
        count = self._recv(scratch)
        used = min(count, wanted)
        view[done:done + used] = scratch[:used]
        if count > used:
            self._ahead = memoryview(bytes(scratch[used:count]))
        return used

    async def readexactly(self, size: int) -> bytearray:
        buffer = bytearray(size)
        await self.readinto(memoryview(buffer))
        return buffer

    async def send(self, buffers, fds=()) -> None:
        """Write every buffer, in order; ``fds`` go with the first byte."""
        views = [view for view in (memoryview(b).cast("B") for b in buffers) if len(view)]
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while views:
            try:
                sent = self.sock.sendmsg(views[:_MAX_IOV], ancillary)
            except (BlockingIOError, InterruptedError):
                await self._wait(True)
                continue
            ancillary = []
            while sent:
                if sent >= len(views[0]):
                    sent -= len(views.pop(0))
                else:
                    views[0], sent = views[0][sent:], 0

    def drop_fds(self) -> None:
        """Close every descriptor received and not taken."""
        close_fds(self.fds)
        self._fd_ends.clear()

    def take_fds(self) -> list[int]:
        """The descriptors whose message has been read to its end by now."""
        count = sum(1 for end in self._fd_ends if end <= self._delivered)
        fds, self.fds = self.fds[:count], self.fds[count:]
        del self._fd_ends[:count]
        return fds

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._fileno)
            loop.remove_writer(self._fileno)
        except RuntimeError:
            pass  # no loop running
        self.drop_fds()
        self._ahead = memoryview(b"")
        self._discard_unread()
        self.sock.close()
        for waiting in self._waiting:  # whoever waits on this socket learns it is gone
            if not waiting.done():
                waiting.set_exception(ConnectionResetError("the connection was closed"))

    def _discard_unread(self) -> None:
        """Read (and drop) input already queued, up to a bound: closing a Unix
        socket with unread data resets the peer, which would then lose the
        answers still queued for it (e.g. a too_large error)."""
        scratch = bytearray(64 * 1024)
        for _ in range(64):
            try:
                if self.sock.recv_into(scratch, len(scratch), socket.MSG_DONTWAIT) <= 0:
                    return
            except OSError:
                return


class BufferPool:
    """Attachment buffers kept for reuse, by size (event loop only).

    A fresh multi-megabyte buffer costs a page fault per 4 KiB when the
    socket read first writes it, more than the read itself; clients send the
    same sizes again and again (one camera, one model). A returned buffer
    waits in ``_returned`` until nothing else refers to it (its reference
    count is the pool's own: an array or view over it holds one more, and
    the device thread may hold its last job a little longer), and only then
    can it be handed out again, so memory in use is never overwritten."""

    MIN_BYTES = 64 * 1024        # smaller buffers are cheap to allocate
    MAX_RETURNED = 8             # buffers waiting to be released, oldest dropped

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.held = 0            # bytes of idle buffers in _free
        self._free: dict[int, list[np.ndarray]] = {}
        self._returned: list[np.ndarray] = []
        self._lone = self._refs([np.empty(1, np.uint8)], 0)

    @staticmethod
    def _refs(container: list, index: int) -> int:
        return sys.getrefcount(container[index])

    def _sweep(self) -> None:
        """Move returned buffers nothing refers to any more into ``_free``."""
        index = 0
        while index < len(self._returned):
            if self._refs(self._returned, index) > self._lone:
                index += 1
                continue
            block = self._returned.pop(index)
            if self.held + block.size <= self.max_bytes:
                self._free.setdefault(block.size, []).append(block)
                self.held += block.size

    def get(self, size: int) -> np.ndarray:
        if size >= self.MIN_BYTES:
            self._sweep()
            free = self._free.get(size)
            if free:
                self.held -= size
                return free.pop()
        return np.empty(size, np.uint8)

    def put(self, block: np.ndarray) -> None:
        """Give a buffer back (the caller keeps no reference it will use again)."""
        if block.size < self.MIN_BYTES:
            return
        self._returned.append(block)
        del block
        if len(self._returned) > self.MAX_RETURNED:
            del self._returned[0]
        self._sweep()


# ---------------------------------------------------------------- frame metadata

def may_have_attachments(body) -> bool:
    """Cheap test on the raw JSON: False means the frame has no attachments."""
    return _ATTACHMENTS_KEY in body


def attachment_sizes(message: dict) -> list[int]:
    """The frame's ``attachments`` list, checked (empty when absent)."""
    sizes = message.get("attachments")
    if sizes is None:
        return []
    if not isinstance(sizes, list) or len(sizes) > MAX_ATTACHMENTS or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes):
        raise RequestError(BAD_REQUEST, f"attachments must be a list of at most {MAX_ATTACHMENTS} "
                                        f"byte sizes (integers >= 0)", fatal=True)
    return sizes


def declared_fds(message: dict) -> int:
    count = message.get("fds", 0)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_FDS:
        raise RequestError(BAD_REQUEST, f"fds must be an integer from 0 to {MAX_FDS}")
    return count


def check_fds(message: dict, received: int, truncated: bool) -> None:
    """The descriptors that came with a frame against its ``fds`` count."""
    if truncated:
        raise RequestError(BAD_REQUEST, f"More than {MAX_FDS} file descriptors sent with one frame")
    declared = declared_fds(message)
    if received != declared:
        raise RequestError(BAD_REQUEST, f"Frame declares fds: {declared} but {received} file "
                                        f"descriptor(s) came with it")


# ---------------------------------------------------------------- packing

def _contiguous(array_: np.ndarray) -> np.ndarray:
    """C order, same shape (np.ascontiguousarray would make a 0-d array 1-d)."""
    return array_ if array_.flags.c_contiguous else np.ascontiguousarray(array_).reshape(array_.shape)


def pack(message: dict, *, shm_min_bytes: int | None, place=None) -> tuple[bytes, list, list[int]]:
    """A message with ndarrays inside → (header + JSON, attachment buffers, fds).

    ``place(array)`` may put an array in a registered buffer (and give
    ``{"buffer": id, "offset": n}``; None: it did not); other arrays of at
    least ``shm_min_bytes`` (None: never) go in a new one-shot memfd, the
    rest as attachments. The caller sends the fds and then closes them."""
    buffers: list = []
    fds: list[int] = []

    def encode(value):
        if isinstance(value, np.ndarray):
            array_ = _contiguous(value)
            ref = {"dtype": array_.dtype.name, "shape": list(array_.shape)}
            placed = place(array_) if place is not None else None
            if placed is None and shm_min_bytes is not None and array_.nbytes >= shm_min_bytes and array_.nbytes:
                fds.append(shm.create_memfd(array_))
                placed = {"shm": len(fds) - 1, "offset": 0}
            if placed is not None:
                ref.update(placed)
            else:
                buffers.append(array_)
                ref["attachment"] = len(buffers) - 1
            return ref
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, dict):
            return {key: encode(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [encode(item) for item in value]
        return value

    try:
        encoded = encode(message)
        if buffers:
            encoded["attachments"] = [buffer.nbytes for buffer in buffers]
        if fds:
            encoded["fds"] = len(fds)
        body = json.dumps(encoded, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except BaseException:
        close_fds(fds)
        raise
    return p.HEADER.pack(len(body)) + body, buffers, fds


async def read_message(stream: SocketStream, max_message_bytes: int) -> tuple[dict, list, list[int]]:
    """Client side: the next frame as (message, attachments, fds); the caller closes the fds."""
    header = await stream.readexactly(p.HEADER_SIZE)
    body = await stream.readexactly(p.parse_length(bytes(header), max_message_bytes))
    message = p.decode_body(body)
    attachments = []
    sizes = attachment_sizes(message) if may_have_attachments(body) else []
    if len(body) + sum(sizes) > max_message_bytes:
        raise RequestError(p.TOO_LARGE, f"Message of {len(body) + sum(sizes)} bytes with its attachments "
                                        f"exceeds the limit of {max_message_bytes} bytes", fatal=True)
    for size in sizes:
        block = np.empty(size, np.uint8)
        await stream.readinto(memoryview(block))
        attachments.append(block)
    fds = stream.take_fds()
    return message, attachments, fds
