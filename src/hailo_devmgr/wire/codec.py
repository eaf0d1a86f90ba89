"""The one frame codec of the device socket (protocol v1 and v2), sans I/O.

No sockets, no asyncio, no threads: bytes and descriptors go in, frames
come out; a message goes in, buffers and descriptors come out. The daemon,
both clients, the fuzzers and the tests frame through this module and
nothing else (docs/protocol.md, sections 2 and 12).

A frame: a 4-byte big-endian length N, N bytes of JSON (one object), then,
in v2, the raw blocks its top-level ``"attachments": [n0, n1, ...]`` lists,
back to back; ``"fds": N`` counts the descriptors (SCM_RIGHTS) sent with
the frame's first byte.

Reading: :class:`FrameReader`
-----------------------------

The caller owns the I/O and asks the reader what to do next::

    reader = FrameReader(max_message_bytes)
    while True:
        event = reader.next_event()
        if event is NEED_DATA:
            view = reader.want()                  # where the next bytes go
            count, fds = <read into view>         # or read ahead and feed()
            reader.got(count, fds)                # 0 bytes: end of stream
        elif isinstance(event, Header):           # event.length: the JSON's size
            ...                                   # charge it before any body memory is taken
        elif isinstance(event, Body):             # only with decode=False, only when
            sizes = reader.attach(decode(event.body))   # the JSON may list attachments
        elif isinstance(event, Frame):
            ...                                   # event.message/.body, .attachments, .fds

Contract:

- ``next_event()`` advances by at most one event and returns it, or
  ``NEED_DATA`` when every byte it was given is used. ``Header(length)``
  comes as soon as the 4 header bytes are in and before any memory for
  the body is taken (the limit is checked first: ``too_large``); the body
  is then taken in chunks of at most ``chunk_bytes``, each allocated only
  when bytes for it are there (or asked for by ``want()``): a header
  claiming 64 MiB followed by one byte holds one chunk.
- ``want()`` (only after ``NEED_DATA``) is a writable view of the rest of
  the current target: header, body chunk, or the attachment buffer itself
  (from ``allocate(size)``), so large attachments are read straight into
  their final buffer. ``got(count, fds)`` says ``count`` bytes were
  written at the start of that view. ``feed(data, fds)`` gives bytes read
  elsewhere (a read-ahead scratch buffer, a test, a fuzzer); the two may
  be mixed. A read of 0 bytes is the end of the stream: see ``mid_frame``.
- Descriptors are tagged with the stream position where the read that
  brought them ended, and belong to the frame containing that position
  (the kernel ends a read with the message that carries descriptors, so
  a read-ahead that took the next frame's start carries none of its
  descriptors, and one that carries descriptors ends in their frame).
  At most ``MAX_FDS`` are held at once: the rest are closed on arrival
  and the frame they belong to gets ``fds_truncated``; ``admit_fds(count)``,
  if given, is asked before descriptors are kept (False: closed too).
- With ``decode=True`` (clients) the reader decodes each JSON body itself
  and reads the attachments it lists. With ``decode=False`` (the daemon,
  which decodes where and when it likes) a frame whose JSON cannot hold
  ``"attachments"`` ends with its body (``Frame.message`` None); one that
  may gives ``Body(body)`` and waits for ``attach(message)`` (the decoded
  JSON, or None if it could not be decoded: then the frame has no
  attachments). ``attach`` checks the list, the total against
  ``max_message_bytes`` and returns the sizes, before any buffer exists.
- ``v2`` False (a daemon connection before hello): attachments or
  descriptors with a frame are refused.
- Errors are :class:`~hailo_devmgr.wire.protocol.RequestError` with
  ``fatal=True``: the framing is lost; the reader raises the same error
  again if asked, and ``close()`` closes every descriptor it holds. Checks
  that leave the framing intact (descriptors against ``"fds"``) are the
  caller's, with :func:`check_fds`, per frame.
- Descriptors of a returned Frame are the caller's to close.

Writing: :func:`encode`
-----------------------

``encode(message)`` turns a message holding ndarrays into
``(buffers, fds)``: ``buffers[0]`` is header + JSON, the rest are the
attachment blocks, ready for one gathered ``sendmsg`` with ``fds`` as
SCM_RIGHTS. Without ndarrays it is a plain v1 frame.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import protocol as p
from .protocol import BAD_REQUEST, TOO_LARGE, RequestError

MAX_ATTACHMENTS = 256          # blocks after one frame's JSON
MAX_FDS = 16                   # descriptors with one frame
BODY_CHUNK = 1024 * 1024       # the body is taken (and its memory allocated) this much at a time
_ATTACHMENTS_KEY = b'"attachments"'


def close_fds(fds) -> None:
    """Close every descriptor in ``fds`` (a list, emptied)."""
    while fds:
        fd = fds.pop()
        try:
            os.close(fd)
        except OSError:
            pass


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
    """The descriptors that came with a frame against its ``fds`` count (not fatal)."""
    if truncated:
        raise RequestError(BAD_REQUEST, f"More than {MAX_FDS} file descriptors sent with one frame")
    declared = declared_fds(message)
    if received != declared:
        raise RequestError(BAD_REQUEST, f"Frame declares fds: {declared} but {received} file "
                                        f"descriptor(s) came with it")


# ---------------------------------------------------------------- events

class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True)
class Header:
    """The 4 header bytes are in: the JSON body will be ``length`` bytes."""

    length: int


@dataclass(frozen=True)
class Body:
    """(decode=False) The JSON may list attachments: decode it and ``attach()``."""

    body: bytes


@dataclass(eq=False)
class Frame:
    """One whole frame."""

    body: bytes
    message: dict | None = None          # the decoded JSON (None: the caller decodes ``body``)
    attachments: list = field(default_factory=list)   # buffers from ``allocate``, in order
    fds: list = field(default_factory=list)           # the caller closes them
    fds_truncated: bool = False          # more than MAX_FDS came: the rest were closed

    @property
    def size(self) -> int:
        """JSON and attachment bytes (what counts against max_message_bytes)."""
        return len(self.body) + sum(memoryview(block).nbytes for block in self.attachments)


def _new_attachment(size: int) -> np.ndarray:
    return np.empty(size, np.uint8)


_HEADER, _BODY, _WAIT_MESSAGE, _ATTACHMENTS, _DONE = range(5)


class FrameReader:
    """Frames from a byte stream with descriptors; see the module's contract."""

    def __init__(self, max_message_bytes: int = p.DEFAULT_MAX_MESSAGE_BYTES, *,
                 chunk_bytes: int = BODY_CHUNK, decode: bool = True, v2: bool = True,
                 allocate: Callable[[int], Any] = _new_attachment,
                 admit_fds: Callable[[int], bool] | None = None):
        self.max_message_bytes = max_message_bytes
        self.chunk_bytes = max(1, chunk_bytes)
        self.decode = decode
        self.v2 = v2
        self.allocate = allocate
        self.admit_fds = admit_fds
        self._pending = bytearray()      # fed, not yet used
        self._pos = 0                    # used up to here in _pending
        self._received = 0               # stream bytes given to the reader (feed and got)
        self._fds: list[tuple[int, int]] = []   # (stream position of the read's end, fd)
        self._cuts: list[int] = []       # positions of reads whose extra descriptors were closed
        self._error: RequestError | None = None
        self._closed = False
        self._start = 0                  # stream position where the frame being read starts
        self._head = bytearray(p.HEADER_SIZE)   # a header that comes in pieces (reused: parsed once whole)
        self._new_frame()

    def _new_frame(self) -> None:
        self._phase = _HEADER
        self._target: memoryview | None = None   # where the next bytes go (made when they come)
        self._filled = 0
        self._length = 0
        self._remaining = 0              # body bytes not yet in a chunk
        self._parts: list = []
        self._chunk: bytearray | None = None
        self._body = b""
        self._message: dict | None = None
        self._sizes: list[int] = []
        self._blocks: list = []
        self._allocate_frame: Callable[[int], Any] | None = None   # attach()'s, this frame only

    # -- what the caller sees

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet used by a frame."""
        return len(self._pending) - self._pos

    @property
    def pending(self) -> int:
        """Bytes received past the last whole frame (of the frames still to come)."""
        return self._received - self._start

    @property
    def held_fds(self) -> int:
        """Descriptors received and not yet handed over with a frame."""
        return len(self._fds)

    @property
    def mid_frame(self) -> bool:
        """Some of a frame has come, not all of it (end of stream now: a cut frame)."""
        return self._phase != _HEADER or self._filled > 0 or self.buffered > 0

    @property
    def frame_length(self) -> int | None:
        """The JSON length of the frame being read, once its header is in."""
        return None if self._phase == _HEADER else self._length

    def feed(self, data, fds=(), truncated: bool = False) -> None:
        """Bytes read ahead (any amount), with the descriptors that came with that read."""
        self._check_open()
        if len(data):
            if self._pos:   # what is used goes (what is left is at most a frame's start)
                del self._pending[:self._pos]
                self._pos = 0
            self._pending += data
            self._received += len(data)
        if fds or truncated:
            self._keep_fds(fds, truncated)

    @property
    def reading_header(self) -> bool:
        """Between frames or inside a header: the next read is a small one
        (up to a read-ahead's worth, fed), never into a buffer of the reader's."""
        return self._phase == _HEADER

    def want(self) -> memoryview:
        """Where the next bytes go (after NEED_DATA): the rest of the current target."""
        self._check_open()
        if self.buffered:
            raise RuntimeError("want() with bytes still buffered: call next_event() first")
        if self._target is None:
            self._target = self._open_target()
            if self._target is None:
                raise RuntimeError("want() while the reader waits for attach()")
        return self._target[self._filled:]

    def got(self, count: int, fds=(), truncated: bool = False) -> None:
        """``count`` bytes were written at the start of the last ``want()`` view."""
        self._check_open()
        if self._target is None or count > len(self._target) - self._filled:
            raise RuntimeError("got() more bytes than want() offered")
        self._filled += count
        self._received += count
        self._keep_fds(fds, truncated)

    def attach(self, message: dict | None, allocate: Callable[[int], Any] | None = None) -> list[int]:
        """(After Body) The decoded JSON of the frame (None: not decodable, no
        attachments): checks its ``attachments`` and returns their sizes.
        ``allocate`` (default the reader's) makes each block's buffer, when its
        first byte is there."""
        self._check_open()
        if self._phase != _WAIT_MESSAGE:
            raise RuntimeError("attach() only after a Body event")
        self._message = message
        try:
            self._sizes = self._checked_sizes(message)
        except RequestError as error:
            raise self._fail(error) from None
        if allocate is not None:
            self._allocate_frame = allocate
        self._phase = _ATTACHMENTS if self._sizes else _DONE
        return list(self._sizes)

    def take_plain(self, admit: Callable[[int], bool] | None = None) -> bytes | None:
        """(decode=False) The JSON body of the next frame, taken in one step
        instead of the events, when all of it is here already and it is a
        plain one: no descriptors came and its JSON cannot list attachments
        (the usual small request). A Frame of that body alone. ``admit(length)``
        is asked first: the caller charges the length there (False: nothing
        is taken). None: use :meth:`next_event`, which also reports whatever
        is wrong with the frame."""
        if self.decode or self._phase != _HEADER or self._filled or self._fds or self._cuts \
                or self._error is not None or self._closed:
            return None
        pending = self._pending
        start = self._pos + p.HEADER_SIZE
        if len(pending) < start:
            return None
        length = int.from_bytes(pending[self._pos:start], "big")
        end = start + length
        if length > self.max_message_bytes or len(pending) < end or pending.find(_ATTACHMENTS_KEY, start, end) >= 0:
            return None
        if admit is not None and not admit(length):
            return None
        body = bytes(pending[start:end])
        self._pos = end
        self._start = self._received - (len(pending) - end)
        return body

    def next_event(self):
        """The next event (Header, Body, Frame) or NEED_DATA."""
        self._check_open()
        while True:
            phase, buffered = self._phase, len(self._pending) - self._pos
            if phase == _WAIT_MESSAGE:
                raise RuntimeError("the reader waits for attach() after a Body event")
            if phase == _DONE:
                return self._finish()
            if phase == _BODY and self._remaining == 0 and self._target is None:
                event = self._body_done()
                if event is not None:
                    return event
                continue
            if phase == _ATTACHMENTS and self._target is None and len(self._blocks) == len(self._sizes):
                self._phase = _DONE
                continue
            if phase == _HEADER and not self._filled and buffered >= p.HEADER_SIZE:
                return self._whole_header()   # a header read whole with what came before: no copy
            if self._target is None:
                if phase == _BODY and not self._parts and buffered >= self._remaining:
                    self._take_whole_body()  # a small body, all fed: one copy
                    continue
                if phase == _ATTACHMENTS and self._sizes[len(self._blocks)] == 0:
                    self._blocks.append(self._allocator()(0))
                    continue
                if not buffered:
                    return NEED_DATA
                self._target = self._open_target()
            self._fill_from_pending()
            if self._filled < len(self._target):
                return NEED_DATA
            event = self._target_full()
            if event is not None:
                return event

    def frames(self) -> list[Frame]:
        """Every whole frame in what was given so far, Header events passed over.
        With decode=False, a Body is decoded here (JSON that does not decode:
        no attachments, ``message`` None); for callers with no say in either."""
        frames = []
        while True:
            body = self.take_plain()
            if body is not None:   # the daemon's way to a plain frame (Session._take_plain)
                frames.append(Frame(body))
                continue
            event = self.next_event()
            if event is NEED_DATA:
                return frames
            if isinstance(event, Frame):
                frames.append(event)
            elif isinstance(event, Body):
                try:
                    message = p.decode_body(event.body)
                except RequestError:
                    message = None
                self.attach(message)
                self._message = message

    def close(self) -> None:
        """Drop everything: descriptors held are closed, buffers let go."""
        if self._closed:
            return
        self._closed = True
        fds = [fd for _, fd in self._fds]
        self._fds.clear()
        close_fds(fds)
        self._pending = bytearray()
        self._pos = 0
        self._parts, self._chunk, self._blocks, self._target = [], None, [], None

    # -- inside

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise RuntimeError("the frame reader is closed")

    def _fail(self, error: RequestError) -> RequestError:
        if not error.fatal:
            error = RequestError(error.code, error.message, retry_after_ms=error.retry_after_ms,
                                 fatal=True, field=error.field)
        self._error = error
        return error

    def _keep_fds(self, fds, truncated: bool) -> None:
        """Descriptors that came with a read (any sequence), tagged with its end."""
        if not fds and not truncated:
            return   # the usual read: none came
        fds = list(fds)
        room = max(0, MAX_FDS - len(self._fds))
        keep, extra = fds[:room], fds[room:]
        if keep and self.admit_fds is not None and not self.admit_fds(len(keep)):
            keep, extra = [], fds   # the owner's bound: closed at once as well
        self._fds.extend((self._received, fd) for fd in keep)
        if extra or truncated:
            self._cuts.append(self._received)
            close_fds(extra)

    def _allocator(self) -> Callable[[int], Any]:
        return self._allocate_frame or self.allocate

    def _open_target(self) -> memoryview | None:
        """The buffer the next bytes go to, allocated now (not before bytes come)."""
        if self._phase == _HEADER:
            return memoryview(self._head)
        if self._phase == _BODY:
            self._chunk = bytearray(min(self.chunk_bytes, self._remaining))
            return memoryview(self._chunk)
        if self._phase == _ATTACHMENTS:
            block = self._allocator()(self._sizes[len(self._blocks)])
            self._blocks.append(block)
            view = memoryview(block)
            return view if view.format == "B" and view.ndim == 1 else view.cast("B")
        return None

    def _fill_from_pending(self) -> None:
        count = min(self.buffered, len(self._target) - self._filled)
        if count:
            self._target[self._filled:self._filled + count] = self._pending[self._pos:self._pos + count]
            self._filled += count
            self._pos += count

    def _take_whole_body(self) -> None:
        end = self._pos + self._remaining
        self._parts.append(bytes(self._pending[self._pos:end]))
        self._pos = end
        self._remaining = 0

    def _whole_header(self) -> Header:
        start = self._pos
        self._pos += p.HEADER_SIZE
        self._target = None
        return self._header(self._pending[start:self._pos])

    def _header(self, raw) -> Header:
        try:
            self._length = p.parse_length(bytes(raw), self.max_message_bytes)
        except RequestError as error:
            raise self._fail(error) from None
        self._phase, self._remaining = _BODY, self._length
        return Header(self._length)

    def _target_full(self):
        """The current target is complete: move on; an event if there is one."""
        self._target, self._filled = None, 0
        if self._phase == _HEADER:
            return self._header(self._head)
        if self._phase == _BODY:
            self._parts.append(self._chunk)
            self._remaining -= len(self._chunk)
            self._chunk = None
        return None   # an attachment block: next_event moves on

    def _body_done(self):
        parts, self._parts = self._parts, []
        if len(parts) == 1:
            body = parts[0] if isinstance(parts[0], bytes) else bytes(parts[0])
        else:
            body = b"".join(parts)
        self._body = body
        if self.decode:
            try:
                self._message = p.decode_body(body)
            except RequestError as error:  # its attachments cannot be trusted: framing lost
                raise self._fail(error) from None
            if "attachments" in self._message:
                self._phase = _WAIT_MESSAGE
                self.attach(self._message)
            else:
                self._phase = _DONE
            return None
        if may_have_attachments(body):
            self._phase = _WAIT_MESSAGE
            return Body(body)
        self._phase = _DONE
        return None

    def _checked_sizes(self, message: dict | None) -> list[int]:
        if not isinstance(message, dict) or "attachments" not in message:
            return []
        if not self.v2:
            raise RequestError(BAD_REQUEST, "attachments need protocol 2 (send hello first); "
                                            "closing the connection", fatal=True)
        sizes = attachment_sizes(message)
        total = len(self._body) + sum(sizes)
        if total > self.max_message_bytes:
            raise RequestError(TOO_LARGE, f"Message of {total} bytes with its attachments "
                                          f"exceeds the limit of {self.max_message_bytes} bytes", fatal=True)
        return sizes

    def _finish(self) -> Frame:
        end = self._received - self.buffered - (self._filled if self._target is not None else 0)
        fds, truncated = self._fds_until(end)
        self._start = end
        frame = Frame(self._body, self._message, self._blocks, fds, truncated)
        if not self.v2 and (fds or truncated):
            close_fds(fds)
            raise self._fail(RequestError(BAD_REQUEST, "File descriptors need protocol 2 (send hello first); "
                                                       "closing the connection", fatal=True))
        self._new_frame()
        return frame

    def _fds_until(self, end: int) -> tuple[list[int], bool]:
        """The descriptors that came with the frame ending at stream position
        ``end``, and whether some of them were closed on arrival."""
        if not self._fds and not self._cuts:
            return [], False   # the usual frame: none came
        count = 0
        while count < len(self._fds) and self._fds[count][0] <= end:
            count += 1
        fds = [fd for _, fd in self._fds[:count]]
        del self._fds[:count]
        truncated = bool(self._cuts) and self._cuts[0] <= end
        while self._cuts and self._cuts[0] <= end:
            self._cuts.pop(0)
        return fds, truncated


# ---------------------------------------------------------------- writing

def _contiguous(array_: np.ndarray) -> np.ndarray:
    """C order, same shape (np.ascontiguousarray would make a 0-d array 1-d)."""
    return array_ if array_.flags.c_contiguous else np.ascontiguousarray(array_).reshape(array_.shape)


def encode(message: dict, *, shm_min_bytes: int | None = None, place=None) -> tuple[list, list[int]]:
    """A message, ndarrays anywhere inside → (buffers, fds) for one ``sendmsg``.

    ``buffers[0]`` is the 4-byte header and the JSON, the others the
    attachment blocks it lists. ``place(array)`` may put an array in a
    registered buffer (and give ``{"buffer": id, "offset": n}``; None: it
    did not); other arrays of at least ``shm_min_bytes`` (None: never) go
    in a new sealed one-shot memfd, the rest as attachments. numpy scalars
    become JSON numbers. The caller sends the fds and then closes them."""
    buffers: list = []
    fds: list[int] = []

    def encode_value(value):
        if isinstance(value, np.ndarray):
            array_ = _contiguous(value)
            ref = {"dtype": array_.dtype.name, "shape": list(array_.shape)}
            placed = place(array_) if place is not None else None
            if placed is None and shm_min_bytes is not None and array_.nbytes >= shm_min_bytes and array_.nbytes:
                from . import shm   # only senders of shared memory need it
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
            return {key: encode_value(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [encode_value(item) for item in value]
        return value

    try:
        encoded = encode_value(message)
        if buffers:
            encoded["attachments"] = [buffer.nbytes for buffer in buffers]
        if fds:
            encoded["fds"] = len(fds)
        body = p.encode_json(encoded)
    except BaseException:
        close_fds(fds)
        raise
    return [p.HEADER.pack(len(body)) + body, *buffers], fds
