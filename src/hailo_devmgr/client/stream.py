"""The socket side of the device protocol, for the asyncio client and the daemon.

:class:`SocketStream` is the only thing that touches an asyncio socket:
reads into the caller's buffers (``recvmsg_into``) and gathered writes
(``sendmsg``), on the event loop with ``add_reader``/``add_writer``.
Frames are cut by the codec (:class:`hailo_devmgr.wire.codec.FrameReader`):
``await stream.fill(reader)`` does one read for it, and :func:`read_frame`
loops until a whole frame is in. :func:`read_for` and :func:`send_all` do
the same for a blocking socket (the blocking :class:`~.library.Client`).

Rules:
- A short read may take up to READ_AHEAD bytes more than asked (a small
  frame's header and body in one system call); the reader keeps them for
  the next frame. Descriptors are handed to the reader with the read that
  brought them; it gives them to the frame that read ended in.
- Whoever takes descriptors closes them (``close_fds``) on every path.

It lives outside ``wire/`` because ``wire/`` has no asyncio (DESIGN.md).
"""
from __future__ import annotations

import array
import asyncio
import contextlib
import socket
import threading

from ..wire import protocol as p
from ..wire.codec import MAX_FDS, NEED_DATA, Frame, FrameReader, close_fds

# A read shorter than this takes this much (what has arrived of it): one system
# call for a small frame's header and body. What is read past the frame waits
# in the reader (or the stream), at most this much per connection.
READ_AHEAD = 16 * 1024
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_MAX_IOV = 512
_scratch = threading.local()   # one read-ahead buffer per thread (event loops run in threads)


def _read_ahead_buffer() -> memoryview:
    view = getattr(_scratch, "view", None)
    if view is None:
        view = _scratch.view = memoryview(bytearray(READ_AHEAD))
    return view


# Plain ints: operators on the socket module's enum members cost microseconds a read.
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)
_TRUNCATED = int(socket.MSG_CTRUNC)


def recv_with_fds(sock: socket.socket, view: memoryview) -> tuple[int, list[int], bool]:
    """One ``recvmsg_into``: (bytes read, descriptors, whether the kernel dropped some)."""
    count, ancillary, flags, _ = sock.recvmsg_into([view], _ANC_SIZE, _RECV_FLAGS)
    if not ancillary:
        return count, [], bool(flags & _TRUNCATED)
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[:len(data) - len(data) % received.itemsize])
            fds.extend(received)
    return count, fds, bool(flags & _TRUNCATED)


def read_for(sock: socket.socket, reader: FrameReader) -> int:
    """One read from ``sock`` for ``reader`` (after NEED_DATA): into the buffer
    it wants when that is at least READ_AHEAD bytes, else up to READ_AHEAD
    bytes fed to it. Returns the byte count (0: end of stream); raises what
    the socket raises (BlockingIOError, TimeoutError, ...)."""
    if reader.reading_header:   # the usual read: a request's or an answer's start
        return _read_small(sock, reader)
    view = reader.want()
    if len(view) >= READ_AHEAD:
        count, fds, truncated = recv_with_fds(sock, view)
        _hand_over(reader.got, count, fds, truncated)
        return count
    return _read_small(sock, reader)


def _read_small(sock: socket.socket, reader: FrameReader, most: int = READ_AHEAD) -> int:
    """Up to ``most`` bytes (at most READ_AHEAD) fed to ``reader``, whatever it is reading."""
    scratch = _read_ahead_buffer()[:most]
    count, fds, truncated = recv_with_fds(sock, scratch)
    if fds or truncated:
        _hand_over(reader.feed, scratch[:count], fds, truncated)
    else:
        reader.feed(scratch[:count])   # nothing to close if it refuses
    return count


def _hand_over(give, read, fds: list[int], truncated: bool) -> None:
    """Give a read (bytes, or a count of bytes written in place) to the
    reader; if it refuses it (closed, or failed on an earlier frame), the
    descriptors that came with it are closed here: they are nobody's."""
    try:
        give(read, fds, truncated)
    except BaseException:
        close_fds(fds)
        raise


def read_frame_blocking(sock: socket.socket, reader: FrameReader) -> Frame:
    """The next whole frame from a blocking socket (the reader decodes, decode=True).
    ConnectionResetError at the end of the stream."""
    while True:
        event = reader.next_event()
        if isinstance(event, Frame):
            return event
        if event is NEED_DATA and read_for(sock, reader) == 0:
            raise ConnectionResetError("the daemon closed the connection")


def _views(buffers) -> list[memoryview]:
    return [view for view in (memoryview(b).cast("B") for b in buffers) if len(view)]


def _advance(views: list[memoryview], sent: int) -> None:
    while sent:
        if sent >= len(views[0]):
            sent -= len(views.pop(0))
        else:
            views[0], sent = views[0][sent:], 0


def _rights(fds) -> list:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []


def send_all(sock: socket.socket, buffers, fds=()) -> None:
    """Write every buffer on a blocking socket, in order; ``fds`` go with the first byte."""
    views = _views(buffers)
    ancillary = _rights(fds)
    while views:
        sent = sock.sendmsg(views[:_MAX_IOV], ancillary)
        ancillary = []
        _advance(views, sent)


async def read_frame(stream: "SocketStream", reader: FrameReader) -> Frame:
    """The next whole frame from ``stream`` (the reader decodes, decode=True).
    IncompleteReadError at the end of the stream."""
    while True:
        event = reader.next_event()
        if isinstance(event, Frame):
            return event
        if event is NEED_DATA:
            await stream.fill(reader)


class SocketStream:
    """Reads for a frame reader and gathered writes on a non-blocking stream
    socket, with descriptor passing. One reader and one writer at a time."""

    def __init__(self, sock: socket.socket, send_buffer: int | None = None):
        sock.setblocking(False)
        if send_buffer:
            # A Unix stream socket has at most SO_SNDBUF bytes in flight (208 KiB by
            # default): a 6 MB frame then takes ~60 wake-ups of both event loops.
            # The kernel caps the value at net.core.wmem_max; best effort.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        self.sock = sock
        self.closed = False
        self._fileno = sock.fileno()
        self._waiting: set[asyncio.Future] = set()   # a reader's and a writer's, failed by close
        # A reader that waits: the readable callback reads for it (see fill).
        self._read_waiter: asyncio.Future | None = None
        self._read_for: FrameReader | None = None
        self._reader: FrameReader | None = None      # the one the owner reads with (read-ahead)
        self._watching_reads = False
        # Called once if the peer closes while nobody reads (see _readable).
        self.on_peer_closed = None

    async def _writable(self) -> None:
        if self.closed:
            raise ConnectionResetError("the connection was closed")
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def wake():
            if not ready.done():
                ready.set_result(None)
        loop.add_writer(self._fileno, wake)
        self._waiting.add(ready)
        try:
            await ready
        finally:
            self._waiting.discard(ready)
            if not self.closed:
                loop.remove_writer(self._fileno)

    async def fill(self, reader: FrameReader) -> None:
        """One read for ``reader`` after it said NEED_DATA: straight into the
        buffer it wants when that is large (an attachment), else up to
        READ_AHEAD bytes fed to it (a small frame in one system call).
        IncompleteReadError at the end of the stream (``reader.mid_frame``
        says whether a frame was cut). Descriptors go to the reader, which
        gives them to their frame (and asks its ``admit_fds``).

        When nothing has arrived, the read is made by the readable callback
        as the bytes come: no spurious wake-up, and the descriptor stays
        registered with the event loop from one request to the next (a
        request-answer client costs no epoll_ctl). Nobody waiting when it
        fires: what comes is read ahead into ``reader``, up to READ_AHEAD
        held, so that a peer that sends and closes is seen closing
        (``on_peer_closed``); past that bound reading pauses until the next
        fill."""
        self._reader = reader
        if self._watching_reads:
            # Still watched since the last read: nothing came while its owner
            # was busy (the callback would have paused the watch), or it comes
            # at the next poll. No read attempt bound to fail.
            count = await self._read_when_ready(reader)
        else:
            try:
                count = read_for(self.sock, reader)
            except (BlockingIOError, InterruptedError):
                count = await self._read_when_ready(reader)
            else:
                self._watch_reads()   # so a close while the owner is busy is still seen
        if count == 0:
            raise asyncio.IncompleteReadError(b"", None)

    async def _read_when_ready(self, reader: FrameReader) -> int:
        if self.closed:
            raise ConnectionResetError("the connection was closed")
        loop = asyncio.get_running_loop()
        waiter = self._read_waiter = loop.create_future()
        self._read_for = reader
        self._watch_reads()
        self._waiting.add(waiter)
        try:
            return await waiter
        finally:
            self._waiting.discard(waiter)
            self._read_waiter = self._read_for = None

    def _watch_reads(self) -> None:
        if not self._watching_reads and not self.closed:
            asyncio.get_running_loop().add_reader(self._fileno, self._readable)
            self._watching_reads = True

    def _readable(self) -> None:
        waiter = self._read_waiter
        if waiter is None or waiter.done():
            self._read_ahead()
            return
        try:
            count = read_for(self.sock, self._read_for)
        except (BlockingIOError, InterruptedError):
            return  # woken for nothing: keep waiting
        except Exception as exc:   # the read's failure is the reader's
            waiter.set_exception(exc)
            return
        waiter.set_result(count)

    def _read_ahead(self) -> None:
        """Nobody reads now: what has come goes into the owner's reader while it
        holds less than READ_AHEAD (a peek could not see a close behind unread
        bytes). At the bound, or at the end of the stream, the socket is no
        longer watched (the next fill watches again); the end is told to
        ``on_peer_closed``."""
        reader, closed = self._reader, False
        if reader is not None and reader.buffered < READ_AHEAD:
            try:
                closed = _read_small(self.sock, reader, READ_AHEAD - reader.buffered) == 0
            except (BlockingIOError, InterruptedError):
                return   # nothing there after all: keep watching
            except OSError:
                closed = True   # reset by the peer
            except (RuntimeError, p.RequestError):
                pass     # the reader is closed or failed: its owner finds out when it reads
            else:
                if not closed and reader.buffered < READ_AHEAD:
                    return   # keep watching: more, or the end, may come
        asyncio.get_running_loop().remove_reader(self._fileno)
        self._watching_reads = False
        if closed and self.on_peer_closed is not None:
            notify, self.on_peer_closed = self.on_peer_closed, None
            notify()

    def interrupt_read(self, error: BaseException) -> None:
        """Fail a waiting ``fill`` with ``error`` (a deadline passed)."""
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def send_now(self, buffers, fds=()) -> tuple[list[memoryview], list[int]]:
        """Write what the socket takes without waiting; ``fds`` go with the
        first byte. Returns what is left: the views not written (empty: all
        of it) and the descriptors not sent (all of them when nothing was
        written), for :meth:`send`. An answer to a client that reads costs
        one system call and no event-loop round."""
        if self.closed:
            raise ConnectionResetError("the connection was closed")
        if len(buffers) == 1 and type(buffers[0]) is bytes and not fds:   # the usual answer
            data = buffers[0]
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            return ([], []) if sent == len(data) else ([memoryview(data)[sent:]], [])
        views = _views(buffers)
        fds = list(fds)
        while views:
            try:
                sent = self.sock.sendmsg(views[:_MAX_IOV], _rights(fds))
            except (BlockingIOError, InterruptedError):
                break
            fds = []
            _advance(views, sent)
        return views, fds

    async def send(self, buffers, fds=()) -> None:
        """Write every buffer, in order; ``fds`` go with the first byte."""
        views = _views(buffers)
        ancillary = _rights(fds)
        while views:
            try:
                sent = self.sock.sendmsg(views[:_MAX_IOV], ancillary)
            except (BlockingIOError, InterruptedError):
                await self._writable()
                continue
            ancillary = []
            _advance(views, sent)

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
