"""A session: one client connection (peer, protocol, requests in flight), its frames and answers.

A reader task reads frames as they arrive, so a client that goes away is
noticed at once: its queued device work is dropped and never runs.

- Protocol v1 (every connection starts there): requests are answered one
  at a time, in the order they came, as the earlier device manager did.
- Protocol v2 (after ``hello``): every request is handled as its own task
  and answers go out as they complete (pipelining), matched by
  ``request_id``. At most ``max_inflight`` requests at once; more are
  answered ``busy``.

Each connection writes only its own answers, under one write lock, so
frames never interleave and nothing reaches another client.

Frames are cut by the one codec (wire/codec.py) from reads of
:class:`client.stream.SocketStream`: large attachments are read straight
into their buffers, small frames in one read with what follows kept for the
next, memfds (``SCM_RIGHTS``) handed to the frame they came with. A frame
is its JSON, then the attachments its JSON lists, then its descriptors; its
length is charged to the uid's request bytes (admission.py, per uid and in
all) before any of its body is read, its attachments before their buffers
exist, its descriptors as they arrive; its
descriptors are closed when it has been answered, whatever happened.
A v1 connection that sends attachments or descriptors is answered
``bad_request`` and closed (its framing can no longer be trusted).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..wire import protocol as p
from . import limits
from ..wire import codec, references, transport
from ..client.stream import SocketStream
from ..wire.protocol import RequestError
from .shm_buffers import RegisteredBuffers

log = logging.getLogger(__name__)

INLINE_PARSE_BYTES = 256 * 1024  # larger bodies are parsed in a worker thread
FRAMES_PER_TURN = 8               # frames read ahead handled in a row before other connections' turn
VALUE_BYTES = 80                 # what one JSON value may take decoded (a dict is 64, a list slot 8)
_connection_ids = itertools.count(1)


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection (SO_PEERCRED)."""

    pid: int | None
    uid: int | None
    gid: int | None
    supplementary: tuple = ()    # the peer's groups when it connected (SO_PEERGROUPS)

    @classmethod
    def of(cls, sock: socket.socket | None) -> "Peer":
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except (OSError, AttributeError):
            return cls(None, None, None)
        return cls(*struct.unpack("3i", creds), _peer_groups(sock))

    def log_fields(self) -> dict:
        return {"CLIENT_PID": self.pid, "CLIENT_UID": self.uid}

    def groups(self) -> set[int]:
        """The peer's primary and supplementary group ids, as the kernel gave
        them at connect: not from /proc, which a pid reused later would
        answer for another process (and which the unit may hide)."""
        return ({self.gid} if self.gid is not None else set()) | set(self.supplementary)

    def unit(self) -> str | None:
        """The systemd unit the peer runs in (from its cgroup), if any."""
        if self.pid is None:
            return None
        try:
            lines = Path(f"/proc/{self.pid}/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            leaf = line.rsplit("/", 1)[-1]
            if leaf.endswith((".service", ".scope")):
                return leaf
        return None


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)   # Linux 4.13; 59 where Python lacks the name


def _peer_groups(sock: socket.socket) -> tuple:
    """The peer's supplementary groups at connect (empty if the kernel cannot tell)."""
    size = 4 * 256
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
    except OSError:
        return ()
    return tuple(struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) - len(raw) % 4]))


@dataclass(eq=False)
class Frame:
    """One request as read: JSON body, attachments, descriptors, bytes held."""

    body: bytes = b""
    held: int = 0                   # bytes charged to the uid's pool
    message: dict | None = None     # decoded already (frames with attachments)
    attachments: list = field(default_factory=list)
    fds: list = field(default_factory=list)
    fds_truncated: bool = False
    fds_held: int = 0               # descriptors charged to the uid's pool
    blocks: "references.Blocks | None" = None   # owns the fds once the request uses them
    refusal: RequestError | None = None   # read whole, but refused before it is looked at


class Session:
    def __init__(self, dispatcher, sock: socket.socket):
        self.dispatcher = dispatcher
        self.admission = dispatcher.admission
        self.id = next(_connection_ids)
        self.peer = Peer.of(sock)
        self._protocol = 1
        self.client_label: str | None = None
        self.default_priority: str | None = None
        self.unit = self.peer.unit()      # systemd unit of the peer, read once
        self.inflight: dict = {}        # request_id -> Job (None while validated), for cancel
        self.cancel_requested: set = set()
        self.streams: dict = {}         # request_id -> TokenStream of a streamed infer
        self.binary_results = False     # v2 hello asked for attachments: ndarrays go raw
        self.shm_results = False        # ... and for shared memory: large ones in a memfd
        self.shm_buffers = RegisteredBuffers(dispatcher.config.shm_buffer_max_bytes)
        self._stream = SocketStream(sock)
        self._idle_timer = _IdleTimer(lambda: self._stream.interrupt_read(asyncio.TimeoutError()))
        # The one frame codec: bodies in chunks as bytes come, attachments into
        # the buffer pool's blocks, descriptors charged to the uid on arrival.
        self._reader = codec.FrameReader(dispatcher.config.max_message_bytes,
                                         decode=False, v2=False, allocate=dispatcher.buffers.get,
                                         admit_fds=self._admit_fds)
        self._write_lock = asyncio.Lock()
        self._sends_waiting = 0   # answers not written at once, until written (see send)
        # The client closed while its requests were being answered (seen by the
        # stream while nobody was reading): its queued work was dropped.
        self._peer_closed = False
        self._stream.on_peer_closed = self._peer_went_away
        self.last_active = time.monotonic()   # last frame read or answered (idle eviction)
        self._mid_frame = False                # a frame's first byte has come, not all of it
        self._fds_charged = 0                  # descriptors received for the frame being read
        self.shm_charged = 0                   # registered shared memory counted for this connection
        self._fds_refusal: str | None = None   # why some of them were closed on arrival
        self._tasks: set[asyncio.Task] = set()      # every frame's, refusals and cancels too
        self._requests: set[asyncio.Task] = set()   # requests in flight (the in-flight limit)
        # Frames read and not yet released: a task cancelled before it ever ran
        # never reaches its finally, so the connection's end releases them.
        self._frames: set[Frame] = set()

    @property
    def protocol(self) -> int:
        return self._protocol

    @protocol.setter
    def protocol(self, value: int) -> None:
        """Agreed in hello: from v2 on, frames may carry attachments and descriptors."""
        self._protocol = value
        self._reader.v2 = value >= 2

    @property
    def client_key(self):
        """Fairness key: the peer's uid. More connections or more processes buy no
        more share; a uid is what a client cannot make more of (a unit it can)."""
        return f"uid {self.peer.uid}" if self.peer.uid is not None else f"connection {self.id}"

    async def run(self) -> None:
        in_a_row = 0   # frames taken from what was read already, without a pause
        try:
            while True:
                frame = await self._read_frame()
                if frame is None:
                    break
                self._frames.add(frame)
                if self._stream.closed:
                    break   # cut off (an answer could not be written): nothing read ahead runs
                self.last_active = time.monotonic()
                if self.protocol >= 2:
                    self._spawn(frame)
                    await self._room_for_tasks()
                elif not await self._answer_v1(frame):
                    break
                if not self._reader.buffered:
                    in_a_row = 0
                elif (in_a_row := in_a_row + 1) >= FRAMES_PER_TURN:
                    # Many of this client's frames were here already: the other
                    # connections' go next, or a client that pipelines hundreds
                    # would keep every other client waiting behind all of them.
                    in_a_row = 0
                    await asyncio.sleep(0)
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client went away, or was cut off
        finally:
            # Its queued device work never runs; a running job's answer is dropped.
            self.dispatcher.drop_queued_work(self)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for frame in list(self._frames):  # read but never answered
                self._release(frame)
            self.dispatcher.session_closed(self)
            self.shm_buffers.clear()
            self._idle_timer.cancel()
            self._reader.close()
            self._stream.close()
            self.admission.pending_fds.give(self.peer.uid, self._fds_charged)  # a frame cut short

    async def _read_frame(self) -> Frame | None:
        """The next frame; None when the connection must end.

        Once a frame's first byte has come, all of it must follow within
        ``frame_timeout_s``: a client that stalls mid-frame is cut off and
        the memory reserved for its body is given back."""
        config = self.dispatcher.config
        if not self._reader.buffered and not self._reader.mid_frame:
            try:   # between frames: the connection may rest (idle_timeout_s)
                self._idle_timer.start(config.idle_timeout_s)
                await self._stream.fill(self._reader)
            except asyncio.IncompleteReadError:
                return None  # closed between frames: the normal end
            except asyncio.TimeoutError:
                log.info("closing a connection idle for %g s", config.idle_timeout_s, extra=self.peer.log_fields())
                return None
            finally:
                self._idle_timer.stop()
        frame = self._take_plain()
        if frame is not None:
            return frame
        self._mid_frame = True
        try:
            return await self._read_rest(_FrameClock(config.frame_timeout_s))
        finally:
            self._mid_frame = False

    def _take_plain(self) -> Frame | None:
        """A plain frame read whole already (a small request, with no
        attachments and no descriptors), its length charged to the uid and
        taken in one step when there is room now; else None, and the frame
        is read event by event (_read_rest: the waits, the refusals)."""
        pool, uid = self.admission.pending_bytes, self.peer.uid
        body = self._reader.take_plain(lambda length: pool.take_now(uid, length) is None)
        return None if body is None else Frame(body=body, held=len(body))

    async def _read_rest(self, clock: "_FrameClock") -> Frame | None:
        """Feed the codec until the frame is whole: its length is charged to the
        uid before any of the body is taken, its attachments before their
        buffers exist."""
        reader, frame = self._reader, Frame()
        try:
            event = reader.next_event()
            while not isinstance(event, codec.Frame):
                if event is codec.NEED_DATA:
                    await clock.within(self._stream.fill(reader))
                elif isinstance(event, codec.Header):
                    await self._hold_bytes(frame, event.length, clock)
                else:
                    await self._attach(frame, event.body, clock)
                event = reader.next_event()
            return self._whole(frame, event)
        except limits.PoolTimeout as full:
            # Framing is lost (the rest of the frame is unread): busy, then close.
            error = RequestError(p.BUSY, f"The daemon is holding too many requests ({full.reason}); "
                                         f"closing the connection", retry_after_ms=1000, fatal=True)
            log.warning("refused a frame: %s", error.message, extra={**self.peer.log_fields(), "CODE": error.code})
            self._abandon(frame)
            await self.send(p.error_response(None, error))
            return None
        except RequestError as error:
            log.warning("refused a frame: %s", error.message, extra={**self.peer.log_fields(), "CODE": error.code})
            self._abandon(frame)
            await self.send(p.error_response(_request_of(frame.message), error))
            return None
        except asyncio.IncompleteReadError:
            if reader.frame_length is None:
                log.warning("client sent a truncated frame header and closed", extra=self.peer.log_fields())
            else:
                log.warning("client closed in the middle of a frame", extra=self.peer.log_fields())
            self._abandon(frame)
            return None
        except asyncio.TimeoutError:
            self._abandon(frame)
            return self._stalled()
        except BaseException:
            self._abandon(frame)
            raise

    async def _attach(self, frame: Frame, body: bytes, clock: "_FrameClock") -> None:
        """The JSON may list attachments: decode it now (it says how many bytes
        follow), and charge them before the codec makes their buffers."""
        frame.body = body
        try:
            with clock.paused():  # waiting for room is not the client's time
                frame.message = await self.decode(frame)
        except RequestError as error:
            if error.code in (p.TOO_LARGE, p.BUSY):  # its attachments stay unread: framing is lost
                raise RequestError(error.code, f"{error.message}; closing the connection",
                                   retry_after_ms=error.retry_after_ms, fatal=True) from None
            frame.message = None  # answered as bad JSON later; no attachments can be trusted either
        sizes = self._reader.attach(frame.message)
        if sizes:
            await self._hold_bytes(frame, sum(sizes), clock)

    def _whole(self, frame: Frame, whole: codec.Frame) -> Frame:
        frame.body = whole.body
        frame.attachments = whole.attachments
        frame.fds, frame.fds_truncated = whole.fds, whole.fds_truncated
        self._hold_fds(frame)
        return frame

    async def _hold_bytes(self, frame: Frame, size: int, clock: "_FrameClock") -> None:
        """Charge ``size`` more bytes of this frame to its uid, waiting for room
        (time waited is not the client's: its frame clock stops meanwhile)."""
        pool = self.admission.pending_bytes
        if pool.take_now(self.peer.uid, size, own=frame.held) is not None:   # else taken at once
            with clock.paused():
                await pool.take(self.peer.uid, size, clock.pool_deadline, own=frame.held)
        frame.held += size

    def _admit_fds(self, count: int) -> bool:
        """Charge descriptors to the uid as they arrive (the codec asks), so a
        frame that never ends cannot hold more than the uid's share."""
        reason = self.admission.pending_fds.take_now(self.peer.uid, count)
        if reason is not None:
            self._fds_refusal = reason
            return False
        self._fds_charged += count
        return True

    def _hold_fds(self, frame: Frame) -> None:
        """The charged descriptors become the frame's. If some were refused on
        arrival (closed at once), the frame they came with is answered busy
        (its framing is intact): the one the codec marks ``fds_truncated``,
        their read having ended in it, not a frame read whole before them."""
        # Those of the next frame, read ahead with this one's end, stay charged to it.
        frame.fds_held = len(frame.fds)
        self._fds_charged -= frame.fds_held
        if self._fds_refusal is not None and frame.fds_truncated:
            transport.close_fds(frame.fds)
            frame.refusal = RequestError(p.BUSY, f"Too many file descriptors held for requests "
                                                 f"({self._fds_refusal})", retry_after_ms=100)
            self._fds_refusal = None

    def _abandon(self, frame: Frame) -> None:
        """A frame that failed while read: what it holds, and the descriptors
        received for it so far, go back."""
        self._release(frame)
        self._reader.close()   # the connection ends: what the codec holds goes too
        self.admission.pending_fds.give(self.peer.uid, self._fds_charged)
        self._fds_charged, self._fds_refusal = 0, None

    def _release(self, frame: Frame) -> None:
        """Give back what a frame holds: its bytes and its descriptors."""
        self.admission.pending_bytes.give(self.peer.uid, frame.held)
        self.admission.pending_fds.give(self.peer.uid, frame.fds_held)
        frame.held = frame.fds_held = 0
        self._frames.discard(frame)
        if frame.blocks is not None:
            frame.blocks.close()  # under its lock: a worker thread may be mapping them
        transport.close_fds(frame.fds)
        blocks, frame.attachments = frame.attachments, []
        while blocks:
            self.dispatcher.buffers.put(blocks.pop())

    def _stalled(self) -> None:
        log.warning("closing a connection that stalled mid-frame for %g s (frame_timeout_s)",
                    self.dispatcher.config.frame_timeout_s, extra={**self.peer.log_fields(), "CODE": "timeout"})
        return None

    def is_idle(self) -> bool:
        """Nothing read and not yet answered (closing it loses no request)."""
        return not self._frames and not self._mid_frame

    def describe(self) -> dict:
        """This client, for `status`."""
        return {"pid": self.peer.pid, "uid": self.peer.uid, "unit": self.unit, "client": self.client_label,
                "protocol": self.protocol, "in_flight": len(self.inflight),
                "shm_buffers": self.shm_buffers.count, "shm_buffer_bytes": self.shm_buffers.total_bytes}

    def _spawn(self, frame: Frame) -> None:
        if _is_cancel(frame):
            # Answered at once, and what a client at the limit needs most: never
            # refused, never counted against the in-flight limit.
            task = asyncio.ensure_future(self._answer(frame))
        elif len(self._requests) >= self.dispatcher.config.scheduling.max_inflight_per_connection:
            task = asyncio.ensure_future(self._refuse_busy(frame))
        else:
            task = asyncio.ensure_future(self._answer(frame))
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _room_for_tasks(self) -> None:
        """Stop reading while the connection has twice ``max_inflight`` tasks (its
        requests in flight and as many busy refusals): a client that sends and
        never reads its answers stops being read, and its own socket buffer
        pushes back on it, instead of the daemon's memory."""
        most = 2 * self.dispatcher.config.scheduling.max_inflight_per_connection
        while len(self._tasks) >= most:
            await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)

    async def _answer_v1(self, frame: Frame) -> bool:
        """Answer a v1 frame before reading the next (v1 answers go in order):
        no task and no queue between reading and answering. A client that
        closes meanwhile is still noticed at once (``_peer_went_away``).
        False when the connection must end."""
        try:
            await self._answer(frame)
        except asyncio.CancelledError:
            if not self._peer_closed or asyncio.current_task().cancelling():
                raise
            return False   # its queued job was dropped: the client is gone
        # Closed (its answer could not be written): frames read ahead are not answered.
        return not self._stream.closed

    def _peer_went_away(self) -> None:
        """The stream saw the client close while nobody was reading (a v1
        request being answered, a v2 connection at its in-flight bound): its
        queued device work is dropped now, not when its answer would fail."""
        self._peer_closed = True
        self.dispatcher.drop_queued_work(self)

    async def _answer(self, frame: Frame) -> None:
        try:
            response = await self.dispatcher.answer(frame, self)
            await self.send(response)
        except asyncio.CancelledError:
            raise  # the connection is ending
        except OSError:
            self.close()  # the client went away, or was cut off: the reader ends the connection
        except Exception:
            # Never leave a client waiting: a request must get an answer or a close.
            log.exception("could not answer a request", extra=self.peer.log_fields())
            await self._answer_internal_error()
        finally:
            self._release(frame)

    async def _answer_internal_error(self) -> None:
        error = RequestError(p.INTERNAL_ERROR, "Internal error in the device manager (see its log)")
        try:
            await self.send(p.error_response(None, error))
        except Exception:
            self.close()

    async def _refuse_busy(self, frame: Frame) -> None:
        try:
            waiting = self.admission.turn(self.peer.uid, None, self.id)   # refusals too: the loop's work
            if waiting is not None:
                await waiting
            error = RequestError(p.BUSY, "Too many requests in flight on this connection", retry_after_ms=50)
            message = frame.message
            if message is None:
                try:
                    message = await self.decode(frame)  # for its request_id, which the answer echoes
                except RequestError:
                    pass
            await self.send(self.dispatcher.error_answer(None, message, error, self))
        except OSError:
            self.close()  # the client went away, or was cut off: the reader ends the connection
        finally:
            self._release(frame)

    def close(self) -> None:
        self._stream.close()

    async def send(self, response: dict) -> None:
        """One answer; with binary results, its ndarrays go as attachments or memfds.

        Written at once when no other answer is being written and the socket
        takes it all (the usual case); else the rest waits its turn, bounded
        by ``frame_timeout_s``."""
        if not self.binary_results:
            frame, buffers, fds = p.encode_frame(response), [], []
        else:
            shm_min = self.dispatcher.config.shm_result_min_bytes if self.shm_results else None
            frame, buffers, fds = transport.pack(response, shm_min_bytes=shm_min)
        try:
            pieces, unsent_fds = [frame, *buffers], fds
            if not self._sends_waiting:
                pieces, unsent_fds = self._stream.send_now(pieces, fds)
            if pieces:
                await self._send_later(pieces, unsent_fds)
        finally:
            transport.close_fds(fds)   # ours: the kernel gave the client its own
        self.last_active = time.monotonic()

    async def _send_later(self, pieces: list, fds: list[int]) -> None:
        """What the socket did not take at once, in turn with other answers.
        An answer waiting to be written is memory the client holds: charged
        to its uid (past the bound too: it exists), so that what the uid
        sends next waits until its answers are taken."""
        size = sum(memoryview(piece).nbytes for piece in pieces)
        # Counted from here until written: while any answer waits, none is
        # written at once (the lock alone looks free between a release and
        # its next holder's turn, and a frame would land inside another).
        self._sends_waiting += 1
        self.admission.answer_waiting(self.peer.uid, self.client_key, size)
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a
            # cancellation that comes as the send completes, and the connection
            # would never end.
            async with asyncio.timeout(self.dispatcher.config.frame_timeout_s):
                await self._send_in_turn(pieces, fds)
        except TimeoutError:
            # A client that does not take its answers holds them (and the
            # requests behind them) in our memory: it is cut off.
            log.warning("closing a connection that has not read its answers for %g s (frame_timeout_s)",
                        self.dispatcher.config.frame_timeout_s, extra={**self.peer.log_fields(), "CODE": "timeout"})
            self.close()
            raise ConnectionResetError("the client does not read its answers") from None
        finally:
            self._sends_waiting -= 1
            self.admission.answer_written(self.peer.uid, self.client_key, size)

    async def _send_in_turn(self, buffers: list, fds: list[int]) -> None:
        async with self._write_lock:
            await self._stream.send(buffers, fds)

    async def decode(self, frame: Frame) -> dict:
        """The frame's JSON, decoded once its cost is charged to the uid. JSON
        grows when decoded (``{},`` is 3 bytes and a 64-byte dict): about
        VALUE_BYTES per value count (the text itself is charged already, four
        times over when it may decode to wide characters), judged before
        decoding, and a body whose values would take more than max_message_bytes
        is refused unread. Large bodies are decoded in the fair worker pool."""
        body = frame.body
        waiting = self.admission.turn_to_decode(self.peer.uid, len(body), self.id)
        if waiting is not None:
            await waiting   # the uid's share of this pass of the loop is used (limits.Turns)
        large = len(body) > INLINE_PARSE_BYTES
        key = self.client_key
        values = await self.dispatcher.worker_pool.run(key, _json_values, body) if large else _json_values(body)
        limit = self.dispatcher.config.max_message_bytes
        if values * VALUE_BYTES > limit:
            raise RequestError(p.TOO_LARGE, f"JSON of {len(body)} bytes with about {values} values would take "
                                            f"about {values * VALUE_BYTES} bytes decoded, over the limit of "
                                            f"{limit} (max_message_bytes): send bulk data as a tensor")
        # A text with escapes or non-ASCII may decode to 4 bytes a character.
        wide = not body.isascii() or b"\\u" in body
        cost = values * VALUE_BYTES + (3 * len(body) if wide else 0)
        if cost <= len(body):
            # Grows little (base64 tensors, text): counted without waiting, or
            # a uid's frames on several connections, each holding its body,
            # would wait for one another until their deadlines.
            self.admission.pending_bytes.charge(self.peer.uid, cost)
        elif self.admission.pending_bytes.take_now(self.peer.uid, cost, own=frame.held) is not None:
            # No room now (else taken at once): wait for it, within the frame timeout.
            deadline = asyncio.get_running_loop().time() + self.dispatcher.config.frame_timeout_s
            try:
                await self.admission.pending_bytes.take(self.peer.uid, cost, deadline, own=frame.held)
            except limits.PoolTimeout as full:
                raise RequestError(p.BUSY, f"The daemon is holding too many requests ({full.reason})",
                                   retry_after_ms=1000) from None
        frame.held += cost
        return await self.dispatcher.worker_pool.run(key, p.decode_body, body) if large else p.decode_body(body)


class _IdleTimer:
    """The idle deadline of a connection waiting between frames, with one
    timer per connection instead of one per frame: the timer, when it
    fires, only re-arms for the current deadline (a client that keeps
    asking moves the deadline, not the timer), and calls ``expire`` once
    the connection has really rested that long."""

    def __init__(self, expire):
        self._expire = expire
        self._deadline: float | None = None
        self._handle: asyncio.TimerHandle | None = None

    def start(self, timeout_s: float) -> None:
        if not timeout_s:
            return
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + timeout_s
        if self._handle is None:
            self._handle = loop.call_at(self._deadline, self._fire)

    def stop(self) -> None:
        self._deadline = None

    def _fire(self) -> None:
        self._handle = None
        if self._deadline is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._handle = loop.call_at(self._deadline, self._fire)
        else:
            self._deadline = None
            self._expire()

    def cancel(self) -> None:
        self._deadline = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class _FrameClock:
    """How long a client has left to finish the frame it started.

    Time the daemon spends waiting for room in its pools is not the
    client's, so the clock stops meanwhile; that wait is bounded on its own
    (``pool_deadline``, twice as long: long enough for a frame that holds
    the room to be cut off): nothing in a frame's reading waits forever."""

    def __init__(self, timeout_s: float):
        now = asyncio.get_running_loop().time()
        self.deadline = now + timeout_s
        self.pool_deadline = now + 2 * timeout_s

    async def within(self, reading):
        async with asyncio.timeout_at(self.deadline):  # see Session.send: not wait_for
            return await reading

    @contextlib.contextmanager
    def paused(self):
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            yield
        finally:
            self.deadline += loop.time() - started


def _json_values(body: bytes) -> int:
    """An upper bound of the values in a JSON text: each but the first in a
    container follows a comma, each container opens with a bracket (commas in
    strings count too: an overestimate, never an underestimate)."""
    return body.count(b",") + body.count(b"{") + body.count(b"[") + 1


def _is_cancel(frame: Frame) -> bool:
    """A small frame asking for ``cancel`` (answered at once, so never refused as busy)."""
    if frame.message is None and (len(frame.body) > 1024 or b'"cancel"' not in frame.body):
        return False
    try:
        message = frame.message if frame.message is not None else p.decode_body(frame.body)
    except RequestError:
        return False
    return isinstance(message, dict) and message.get("action") == "cancel"


def _request_of(message) -> p.Request | None:
    """The envelope of a refused frame, so its answer echoes the request_id."""
    request_id, has_id = p.request_id_of(message)
    return p.Request("", {}, request_id, has_id) if has_id else None
