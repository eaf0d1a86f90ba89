"""Client library for services that use the device manager.

Two clients with the same methods: :class:`AsyncClient` (asyncio, async
context manager) and :class:`Client` (blocking, for scripts and threaded
services). Both work with every version of the daemon. ``input_data`` may
hold numpy arrays directly: the async client sends them the fastest way the
daemon offers (protocol v2: shared memory for large ones, in buffers
registered once per connection and reused, binary attachments for the rest;
v1: base64) and gets tensor results back the same way; the blocking client
speaks v2 too (attachments, one-shot memfds for large arrays, no registered
buffers) and falls back to v1 and base64 against an older daemon.

What can go wrong, and whether a retry is safe (docs/client.md):

- :class:`DeviceError`: the daemon answered with an error; ``code`` says
  which (``busy`` and ``shutting_down`` carry ``retry_after_ms``).
- :class:`NotConnected` (a :class:`DaemonUnreachable`): the request never
  reached the daemon. Safe to retry.
- :class:`ConnectionLost` (a :class:`DaemonUnreachable`): the connection
  broke after the request was sent; the daemon may have run it.
- :class:`RequestTimeout` (a :class:`TimeoutError`): no answer within the
  client's ``timeout``; the daemon may still run it.

    from hailo_devmgr.client import Client, tensor
    with Client() as dm:
        dm.load_model("/usr/share/hailo-models/clip.hef", "clip")
        emb = dm.infer("/usr/share/hailo-models/clip.hef", {"mode": "image", "tensor": tensor(img)},
                       "clip")["result"]
"""
from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import os
import socket
import threading
import time
from typing import Any

import numpy as np

from ..wire import codec
from ..wire import protocol as p
from ..wire import references as refs
from ..wire import transport as t
from .._version import __version__
from ..wire.tensors import decode_results, encode_results, encode_v1
from .buffers import ClientBuffers, WritableBuffer
from .stream import SocketStream, read_frame, read_frame_blocking, send_all

# How AsyncClient sends ndarrays found in a request (``transport=``).
TRANSPORTS = ("auto", "shm", "attachments", "base64")

DEFAULT_SOCKET = "/run/hailo/device.sock"
RECONNECT_POLL_S = 0.1


def default_socket_path() -> str:
    return os.environ.get("HAILO_DEVICE_SOCKET") or DEFAULT_SOCKET


class DeviceError(Exception):
    """The daemon answered with an error."""

    def __init__(self, message: str, code: str | None = None, response: dict | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.response = response or {}
        self.retry_after_ms = self.response.get("retry_after_ms")

    def __str__(self) -> str:
        return f"{self.message} ({self.code})" if self.code else self.message


class DaemonUnreachable(ConnectionError):
    """The daemon could not be reached, or the connection to it broke: a
    :class:`NotConnected` or a :class:`ConnectionLost`."""


class NotConnected(DaemonUnreachable):
    """The request never reached the daemon (no daemon listening, no
    permission on the socket, the connection gone before it was sent).
    Safe to retry."""


class ConnectionLost(DaemonUnreachable):
    """The connection broke after the request was sent, before its answer:
    the daemon may have run it. Retry only what is safe to run twice."""


class RequestTimeout(TimeoutError):
    """No answer within the client's ``timeout``. The daemon may still run the
    request (the async client cancels it there); the connection it used is
    closed when a late answer could otherwise be taken for another's."""


def _refused(exc: OSError, socket_path: str) -> NotConnected:
    hint = ""
    if isinstance(exc, PermissionError):
        hint = " (connecting needs membership of the socket's group, hailo by default: " \
               "sudo usermod -aG hailo $USER, then log in again)"
    return NotConnected(f"cannot connect to {socket_path}: {exc.strerror or exc}{hint}")


def tensor(array: np.ndarray) -> dict:
    """A numpy array as a v1 tensor for ``input_data``."""
    return encode_v1(np.asarray(array))


# Both clients build requests and read answers the same way.

def _build(action: str, request_id: int, fields: dict) -> dict:
    message = {"action": action, "request_id": request_id}
    message.update({key: value for key, value in fields.items() if value is not None})
    return message


def _check(message: dict, response: dict, decode: bool) -> dict:
    # Errors about the frame itself (too_large) carry no request_id.
    if "error" in response and response.get("request_id") in (None, message["request_id"]):
        raise DeviceError(str(response["error"]), response.get("code"), response)
    if response.get("request_id") != message["request_id"]:
        raise DeviceError(f"answer for request {response.get('request_id')!r} received for "
                          f"{message['request_id']!r}", p.INTERNAL_ERROR, response)
    if decode and "result" in response:
        response = dict(response, result=decode_results(response["result"]))
    return response


def _unknown_action(error: DeviceError) -> bool:
    """An answer to hello from a daemon without it: code unknown_action, or (the
    earliest daemons, which had no codes) the v1 text alone."""
    return error.code == p.UNKNOWN_ACTION or (error.code is None and error.message.startswith("Unknown action"))


def _has_arrays(value: Any) -> bool:
    return bool(_arrays(value))


def _arrays(value: Any) -> list[np.ndarray]:
    """The ndarrays inside ``value`` (dicts, lists, tuples)."""
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [array for item in value for array in _arrays(item)]
    return []


def _v1_frame(message: dict) -> bytes:
    """A request as a v1 frame: ndarrays in it become base64 tensors."""
    if _has_arrays(message.get("input_data")):
        message = dict(message, input_data=encode_results(message["input_data"]))
    return p.encode_frame(message)


def _resolved(frame: codec.Frame) -> dict:
    """An answer frame's message, its attachment and shm tensors as ndarrays
    (its descriptors closed)."""
    answer = frame.message
    blocks = refs.Blocks(frame.attachments, frame.fds)
    try:
        if (frame.attachments or frame.fds) and "result" in answer:
            answer["result"] = refs.resolve(answer["result"], blocks, 2 ** 62, "result", as_array=True)
    finally:
        blocks.close()
    return answer


def _model_fields(model_path, model_type, model_params, input_data=None) -> dict:
    return {"model_path": model_path, "model_type": model_type,
            "model_params": model_params, "input_data": input_data}


class _Methods:
    """Settings and actions, written once; ``request`` is sync or async per client."""

    def __init__(self, socket_path: str | None = None, *, timeout: float | None = None,
                 max_message_bytes: int = p.DEFAULT_MAX_MESSAGE_BYTES, reconnect_s: float = 0.0):
        """``socket_path``: the daemon's socket (default ``$HAILO_DEVICE_SOCKET``
        or /run/hailo/device.sock). ``timeout``: seconds to wait for an answer
        (None: as long as it takes; the daemon's watchdog bounds a device
        call); past it :class:`RequestTimeout`. ``max_message_bytes``: the
        largest answer accepted. ``reconnect_s``: how long a (re)connect keeps
        trying while the socket refuses (the daemon restarting); 0 fails at
        once. A connection the daemon closed (restart, idle) is replaced by
        the next request, which is sent again when none of it had reached
        the daemon."""
        self.socket_path = socket_path or default_socket_path()
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self.reconnect_s = reconnect_s
        self._ids = itertools.count(1)

    def _keep_trying(self, started: float, exc: OSError) -> bool:
        """After a refused connect: True to try again (within reconnect_s)."""
        retryable = isinstance(exc, (ConnectionRefusedError, FileNotFoundError))
        return retryable and time.monotonic() - started < self.reconnect_s

    def ping(self):
        return self.request("ping")

    def status(self):
        return self.request("status")

    def device_status(self):
        return self.request("device_status")

    def load_model(self, model_path: str, model_type: str, model_params: dict | None = None,
                   keep_alive: float | str | None = None, **scheduling):
        """Load ``model_path`` as ``model_type`` (clip, vlm, whisper, ocr, depth,
        pose, generic: required, there is no guess).

        ``keep_alive``: seconds the model may stay idle (-1 forever, 0 unload
        after this request) or a duration like "10m"; None: the daemon's setting.
        ``scheduling``: ``priority`` ("interactive", "normal", "batch") and
        ``timeout_ms`` (not started by then: a ``timeout`` error)."""
        return self.request("load_model", keep_alive=keep_alive, **scheduling,
                            **_model_fields(model_path, model_type, model_params))

    def unload_model(self, model_path: str, model_type: str):
        return self.request("unload_model", model_path=model_path, model_type=model_type)

    def infer(self, model_path: str, input_data: Any, model_type: str,
              model_params: dict | None = None, decode: bool = True,
              keep_alive: float | str | None = None, **scheduling):
        """Returns the response; ``result`` has ndarrays in place of tensors
        unless ``decode`` is False. ``keep_alive`` and ``scheduling``
        (``priority``, ``timeout_ms``) as for :meth:`load_model`."""
        return self.request("infer", _decode=decode, keep_alive=keep_alive, **scheduling,
                            **_model_fields(model_path, model_type, model_params, input_data))


class AsyncClient(_Methods):
    """asyncio client. With ``pipelining`` (the default) it says ``hello`` and,
    if the daemon speaks protocol 2, keeps many requests in flight on one
    connection; against an older daemon it falls back to v1, one at a time.
    Cancelling a task that awaits a request cancels the request in the daemon.

    ``transport`` says how ndarrays in ``input_data`` travel: "auto" (shared
    memory from ``shm_min_bytes`` up, attachments below, whatever the daemon
    offers), "shm" (every array in shared memory), "attachments", or
    "base64" (v1 tensors). Shared memory goes through buffers registered once
    per connection and reused (``shm_buffers``, when the daemon offers them),
    else through a one-shot sealed memfd per array. Tensor results come back
    as attachments or memfds unless "base64"; either way ``result`` holds
    ndarrays."""

    def __init__(self, socket_path: str | None = None, *, timeout: float | None = None,
                 max_message_bytes: int = p.DEFAULT_MAX_MESSAGE_BYTES, reconnect_s: float = 0.0,
                 pipelining: bool = True, client_name: str | None = None, transport: str = "auto",
                 shm_min_bytes: int = t.DEFAULT_SHM_MIN_BYTES, shm_buffers: bool = True):
        """Settings as for :class:`Client`, and: ``pipelining`` (protocol 2 when
        the daemon speaks it), ``client_name`` (shown in the daemon's status),
        ``transport`` and ``shm_min_bytes`` (how arrays travel, see the class),
        ``shm_buffers`` (reuse registered shared-memory buffers)."""
        super().__init__(socket_path, timeout=timeout, max_message_bytes=max_message_bytes,
                         reconnect_s=reconnect_s)
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.pipelining = pipelining
        self.client_name = client_name or f"hailo_devmgr.client/{__version__}"
        self.transport = transport
        self.shm_min_bytes = 0 if transport == "shm" else shm_min_bytes
        self.use_shm_buffers = shm_buffers
        self._buffers: ClientBuffers | None = None   # registered, once hello offered them
        self._buffers_lock = asyncio.Lock()
        self._connect_lock = asyncio.Lock()
        self.protocol = 1
        self.features: frozenset = frozenset()   # what the daemon offered in hello
        self._lock = asyncio.Lock()         # v1: one request in flight per connection
        self._write_lock = asyncio.Lock()   # v2: whole frames only
        self._pending: dict[int, asyncio.Future] = {}
        self._streams: dict[int, asyncio.Queue] = {}   # v2: chunks of streamed requests
        self._sent: set = set()             # v2: request ids whose frame is written (or being written)
        self._slots = _Slots()              # v2: requests in flight within the daemon's limit
        self._answers: asyncio.Task | None = None
        self._stream: SocketStream | None = None
        self._reader: codec.FrameReader | None = None   # the connection's frames, read ahead included
        # True once connect() finished, hello included: until then no request may
        # use the stream, or it would go out as v1 on a connection becoming v2.
        self._ready = False

    async def connect(self) -> "AsyncClient":
        started = time.monotonic()
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, self.socket_path)
                break
            except OSError as exc:
                sock.close()
                if not self._keep_trying(started, exc):
                    raise _refused(exc, self.socket_path) from exc
                await asyncio.sleep(RECONNECT_POLL_S)
        self._stream = SocketStream(sock, send_buffer=t.CLIENT_SEND_BUFFER)
        self._reader = codec.FrameReader(self.max_message_bytes)
        if self.pipelining:
            await self._negotiate()
        self._ready = True
        return self

    async def _negotiate(self) -> None:
        # hello lists what the client can receive. "auto" leaves out "shm": a result in
        # a new memfd costs fresh pages, slower than an attachment (bench/transport.py).
        # What it sends is its own choice among what the daemon offers.
        receives, sends = {"auto": (["attachments"], ["attachments", "shm", "shm_buffers"]),
                           "shm": (["attachments", "shm"], ["attachments", "shm", "shm_buffers"]),
                           "attachments": (["attachments"], ["attachments"]),
                           "base64": ([], [])}[self.transport]
        hello = _build("hello", next(self._ids), {"protocol": p.PROTOCOL_MAX, "client": self.client_name,
                                                  "features": receives or None})
        try:
            answer = _check(hello, await self._exchange_in_time(hello), False)
        except DeviceError as exc:
            if not _unknown_action(exc):
                raise
            return  # an older daemon: stay on v1
        self.protocol = int(answer.get("protocol", 1))
        self.features = frozenset(answer.get("features") or ()) & frozenset(sends)
        # One below the daemon's limit: registering a buffer for a request is a request too.
        in_flight = (answer.get("limits") or {}).get("max_inflight_per_connection")
        self._slots.limit = max(1, int(in_flight) - 1) if isinstance(in_flight, int) else _Slots.DEFAULT
        if self.protocol >= 2:
            self._answers = asyncio.ensure_future(self._read_answers())
        if "shm_buffers" in self.features and self.use_shm_buffers:
            limits = answer.get("limits") or {}
            self._buffers = ClientBuffers(self._register_buffer, self._unregister_buffer,
                                          int(limits.get("max_shm_buffers", 0)),
                                          int(limits.get("shm_buffer_max_bytes", 0)))

    async def close(self) -> None:
        self._ready = False
        if self._buffers is not None:
            self._buffers.close()
            self._buffers = None
        if self._answers is not None:
            self._answers.cancel()
            await asyncio.gather(self._answers, return_exceptions=True)
            self._answers = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self.protocol = 1
        self.features = frozenset()

    async def __aenter__(self):
        return await self.connect()

    async def __aexit__(self, *exc_info):
        await self.close()

    async def metrics(self) -> dict:
        return await self.request("metrics")

    async def _connected(self) -> bool:
        """Connect if not connected; after the daemon closed a v2 connection, open a
        new one (once, whoever many requests notice it at the same time).
        True when this call connected."""
        if self._ready and not self._lost():
            return False
        async with self._connect_lock:
            if self._lost():
                await self.close()
            if self._ready:
                return False
            if self._stream is not None:  # a connect() that did not finish
                await self.close()
            await self.connect()
            return True

    def _lost(self) -> bool:
        return self._answers is not None and self._answers.done()

    async def request(self, action: str, _decode: bool = True, **fields) -> dict:
        """Send one request (``action`` and its fields) and return its answer."""
        fresh = await self._connected()
        try:
            return await self._request_once(action, _decode, fields)
        except NotConnected:
            if fresh:
                raise
            # A connection the daemon had closed (restart, idle): nothing of the
            # request reached it, so it goes once more on a new connection
            # (_connected replaces a lost one once, however many notice).
            await self._connected()
            return await self._request_once(action, _decode, fields)

    async def _request_once(self, action: str, decode: bool, fields: dict) -> dict:
        message = _build(action, next(self._ids), fields)
        if self.protocol >= 2:
            async with self._slots.turn(fields.get("priority")):
                return _check(message, await self._pipelined(message, []), decode)
        async with self._lock:
            if self._stream is None:  # closed by the request before this one (its timeout)
                raise NotConnected(f"connection to {self.socket_path} closed before the request was sent")
            return _check(message, await self._exchange_in_time(message), decode)

    async def _exchange_in_time(self, message: dict) -> dict:
        """A v1 exchange within ``timeout``. Cut short (timeout or cancel), its
        answer would be read as the next request's: the connection goes."""
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for may lose a cancellation.
            async with asyncio.timeout(self.timeout):
                return await self._exchange(message)
        except TimeoutError:
            await self.close()
            raise RequestTimeout(f"no answer from {self.socket_path} within {self.timeout} s") from None
        except asyncio.CancelledError:
            await self.close()
            raise

    def _encode(self, message: dict) -> tuple[bytes, list, list[int]]:
        """(frame, attachments, fds) for a request: its ndarrays the fastest way agreed."""
        if "attachments" not in self.features or not _has_arrays(message.get("input_data")):
            return _v1_frame(message), [], []
        shm_min = self.shm_min_bytes if "shm" in self.features else None
        place = (self._buffers.placer(message["request_id"], self.shm_min_bytes)
                 if self._buffers is not None and shm_min is not None else None)
        return t.pack(message, shm_min_bytes=shm_min, place=place)

    async def shared_array(self, shape, dtype=np.uint8) -> np.ndarray:
        """A zeroed, writable array in shared memory registered with the daemon.

        Fill it in place (decode a camera frame into it, say) and pass it in
        ``input_data``: it reaches the daemon without being copied. It is
        the daemon's to read while a request that uses it is in flight:
        change it only between requests. Against a daemon without registered
        buffers (or with no room left for one) it is an ordinary array,
        sent the usual way. :meth:`free_shared_array` gives it back;
        closing the client does too."""
        await self._connected()
        dtype = np.dtype(dtype)
        shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(size) for size in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = None
        if self._buffers is not None and nbytes:
            async with self._buffers_lock:
                buffer = await self._buffers.own(nbytes)
        if buffer is None:
            return np.zeros(shape, dtype)
        return buffer.array[:nbytes].view(dtype).reshape(shape)

    async def free_shared_array(self, array: np.ndarray) -> None:
        """Unregister the buffer of an array from :meth:`shared_array` (no-op for others)."""
        if self._buffers is not None:
            async with self._buffers_lock:
                await self._buffers.disown(array)

    def generate(self, model_path: str, input_data: Any, model_type: str,
                 model_params: dict | None = None, keep_alive: float | str | None = None,
                 **scheduling) -> "AsyncGeneration":
        """Text as a generative model (llm, vlm, vlm_chat) makes it:
        ``async for text in client.generate(...)``, then ``.result`` is the
        final answer (``result``: the whole text and its statistics). Against
        a daemon without protocol 2 the whole text comes as one piece.
        ``timeout`` bounds each wait for the next piece, not the whole answer;
        leaving the loop early (or cancelling) stops the generation."""
        fields = {"keep_alive": keep_alive, **scheduling,
                  **_model_fields(model_path, model_type, model_params, input_data)}
        return AsyncGeneration(self, {key: value for key, value in fields.items() if value is not None})

    async def _streamed(self, fields: dict):
        """Yields ("chunk", text) ..., then ("final", answer)."""
        message = _build("infer", next(self._ids), {**fields, "stream": True})
        request_id = message["request_id"]
        async with self._slots.turn(fields.get("priority")):
            if self._stream is None or self._lost():
                raise NotConnected(f"connection to {self.socket_path} closed before the request was sent")
            answer = asyncio.get_running_loop().create_future()
            chunks: asyncio.Queue = asyncio.Queue()
            self._pending[request_id], self._streams[request_id] = answer, chunks
            finished = False
            try:
                try:
                    await self._send(message, [])
                except NotConnected:
                    finished = True
                    yield "final", _check(message, await self._refusal(answer), True)
                    return
                while True:
                    if chunks.empty() and answer.done():
                        finished = True
                        yield "final", _check(message, answer.result(), True)
                        return
                    text = await self._next_chunk(chunks, answer)
                    if text is not None:
                        yield "chunk", text
            finally:
                self._streams.pop(request_id, None)
                if not finished:
                    self._abandon(request_id, answer)   # the generation stops on the device
                self._settle(request_id, answer)

    async def _next_chunk(self, chunks: asyncio.Queue, answer: asyncio.Future) -> str | None:
        """The next piece of text; None when the final answer came first."""
        if not chunks.empty():
            return chunks.get_nowait()
        getting = asyncio.ensure_future(chunks.get())
        try:
            async with asyncio.timeout(self.timeout):
                await asyncio.wait({getting, answer}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise RequestTimeout(f"no word from {self.socket_path} within {self.timeout} s") from None
        finally:
            if not getting.done():
                getting.cancel()
        return getting.result() if getting.done() and not getting.cancelled() else None

    async def _register_buffer(self, buffer: WritableBuffer) -> int | None:
        """The daemon's id for a new buffer; None if it refused it (its limits).
        On this connection only: a buffer belongs to the connection it was registered on."""
        fd = buffer.take_fd()
        if self._stream is None or self._lost():
            os.close(fd)
            raise NotConnected(f"connection to {self.socket_path} lost")
        message = _build("register_buffer", next(self._ids), {"fds": 1})
        try:
            answer = _check(message, await self._pipelined(message, [fd]), False)
        except DeviceError as exc:
            if exc.code != p.BAD_REQUEST:
                raise
            return None
        return answer["buffer"]

    async def _unregister_buffer(self, buffer: WritableBuffer) -> None:
        if self._stream is None or self._lost():
            return  # the connection is gone, and its buffers with it
        message = _build("unregister_buffer", next(self._ids), {"buffer": buffer.buffer_id})
        _check(message, await self._pipelined(message, []), False)

    async def _pipelined(self, message: dict, fds: list[int]) -> dict:
        if self._stream is None or self._lost():
            # The answer reader has stopped (or a reconnect is under way): nobody
            # would read this request's answer.
            t.close_fds(fds)
            raise NotConnected(f"connection to {self.socket_path} closed before the request was sent")
        answer = asyncio.get_running_loop().create_future()
        request_id = message["request_id"]
        self._pending[request_id] = answer
        try:
            try:
                await self._send(message, fds)
            except NotConnected:
                return await self._refusal(answer)
            async with asyncio.timeout(self.timeout):
                return await asyncio.shield(answer)
        except (asyncio.CancelledError, TimeoutError) as exc:
            self._abandon(request_id, answer)
            if isinstance(exc, TimeoutError):
                raise RequestTimeout(f"no answer from {self.socket_path} within {self.timeout} s") from None
            raise
        finally:
            self._settle(request_id, answer)

    def _abandon(self, request_id, answer: asyncio.Future) -> None:
        """A request given up before its answer (cancelled, timed out, left early):
        tell the daemon not to bother (a frame never written needs no cancel);
        the daemon counts it in flight until it answers it."""
        if request_id in self._sent and self._stream is not None and not answer.done():
            asyncio.ensure_future(self._send_quietly(_build("cancel", next(self._ids), {"target": request_id})))
            self._slots.hold_until(answer)

    def _settle(self, request_id, answer: asyncio.Future) -> None:
        """A request's end on this side, however it ended."""
        if request_id not in self._sent:
            self._pending.pop(request_id, None)  # never written: no answer will come
        self._sent.discard(request_id)
        self._forget_when_answered(request_id, answer)

    def _forget_when_answered(self, request_id, answer: asyncio.Future) -> None:
        """Stop waiting for an answer once it came (a late one is then dropped)."""
        def forget(done: asyncio.Future) -> None:
            if self._pending.get(request_id) is done:
                del self._pending[request_id]
            if not done.cancelled():
                done.exception()  # seen: the lost connection may have been reported here as well
        if answer.done():
            forget(answer)
        else:
            answer.add_done_callback(forget)

    async def _refusal(self, answer: asyncio.Future) -> dict:
        """After a send failed: the daemon may have answered before closing (busy
        past the connection limit, too_large); the reader hands that over.
        Anything else: the request never reached the daemon."""
        try:
            async with asyncio.timeout(1.0):
                return await asyncio.shield(answer)
        except DeviceError:
            raise
        except Exception:
            raise NotConnected(f"connection to {self.socket_path} closed before the request was sent") from None

    async def _send(self, message: dict, fds: list[int] | None = None) -> None:
        fds = fds if fds is not None else []
        handed_over = False   # from then on only the answer frees the request's buffers
        stream = self._stream  # buffer ids name buffers of this connection only
        try:
            arrays = _arrays(message.get("input_data")) if self._buffers is not None else []
            if arrays:
                async with self._buffers_lock:  # registered buffers are placed in request order
                    await self._buffers.prepare(arrays, self.shm_min_bytes)
                    frame, buffers, packed = self._encode(message)
            else:
                frame, buffers, packed = self._encode(message)
            fds.extend(packed)
            # Shielded: a frame cut in the middle would break the stream for every request.
            writing = asyncio.ensure_future(self._write(stream, [frame, *buffers], fds))
            writing.add_done_callback(lambda task: task.cancelled() or task.exception())  # seen if abandoned
            handed_over = True
            self._sent.add(message["request_id"])   # it will be written whole: an answer will come
            await asyncio.shield(writing)
        except BaseException as exc:
            if not handed_over:
                self._release_buffers(message)
                t.close_fds(fds)
            if isinstance(exc, OSError):
                raise NotConnected(f"connection to {self.socket_path} closed before the request was sent: "
                                   f"{exc}") from exc
            raise

    async def _write(self, stream: SocketStream, buffers: list, fds: list[int]) -> None:
        """One whole frame (frames never interleave) on the connection it was made
        for; its fds closed once sent."""
        try:
            if stream is None or stream is not self._stream or stream.closed:
                raise ConnectionResetError("the connection this request was made for is closed")
            async with self._write_lock:
                await stream.send(buffers, fds)
        finally:
            t.close_fds(fds)

    def _release_buffers(self, message: dict) -> None:
        if self._buffers is not None:
            self._buffers.release(message.get("request_id"))

    async def _send_quietly(self, message: dict) -> None:
        try:
            await self._send(message)
        except (DaemonUnreachable, DeviceError, AttributeError):
            pass

    async def _read_message(self) -> dict:
        """The next answer, its attachment and shm tensors as ndarrays."""
        if self._reader is None:
            raise ConnectionResetError("the connection was closed")
        return _resolved(await read_frame(self._stream, self._reader))

    async def _read_answers(self) -> None:
        """v2: hand each answer to the request waiting for its request_id."""
        error: Exception = ConnectionLost(f"connection to {self.socket_path} closed by the daemon")
        try:
            while True:
                try:
                    answer = await self._read_message()
                except p.RequestError as exc:
                    if exc.code == p.TOO_LARGE:
                        raise DeviceError(f"answer too large for this client: {exc.message}", p.TOO_LARGE)
                    raise
                if answer.get("stream") is True and answer.get("done") is False:
                    chunks = self._streams.get(answer.get("request_id"))
                    if chunks is not None:
                        chunks.put_nowait(answer.get("chunk", ""))
                    continue   # the request goes on: its final answer comes later
                self._release_buffers(answer)   # the daemon is done with the request's buffers
                waiting = self._pending.get(answer.get("request_id"))
                if waiting is not None and not waiting.done():
                    waiting.set_result(answer)
                elif "request_id" not in answer and "error" in answer:
                    error = DeviceError(str(answer["error"]), answer.get("code"), answer)
                    break  # about the stream itself (too_large): the daemon closes it
        except (OSError, asyncio.IncompleteReadError, DeviceError, p.RequestError) as exc:
            if isinstance(exc, DeviceError):
                error = exc
        finally:
            for waiting in self._pending.values():
                if not waiting.done():
                    waiting.set_exception(error)
            if self._stream is not None:
                # Nobody reads this connection any more: writes on it fail at once,
                # and the next request opens a new one.
                self._stream.close()

    async def _exchange(self, message: dict) -> dict:
        try:
            await self._stream.send([_v1_frame(message)])
        except OSError as exc:
            refusal = await self._unread_answer()
            await self.close()
            if refusal is not None:
                return refusal
            raise NotConnected(f"connection to {self.socket_path} closed before the request was sent: "
                               f"{exc}") from exc
        try:
            return await self._read_message()
        except (OSError, asyncio.IncompleteReadError) as exc:
            await self.close()
            raise ConnectionLost(f"connection to {self.socket_path} lost after the request was sent: "
                                 f"{exc}") from exc
        except p.RequestError as exc:
            await self.close()  # the unread answer leaves the stream unusable
            if exc.code == p.TOO_LARGE:
                raise DeviceError(f"answer too large for this client: {exc.message}", p.TOO_LARGE) from None
            raise


    async def _unread_answer(self) -> dict | None:
        """An answer the daemon wrote before closing (a refusal), if there is one."""
        try:
            async with asyncio.timeout(1.0):
                return await self._read_message()
        except Exception:
            return None


class _Slots:
    """Requests in flight at once on a v2 connection: at most ``limit`` (the
    daemon's announced ``max_inflight_per_connection``, less one). Past it a
    request waits here, the most urgent priority first, then in arrival
    order, instead of being answered ``busy`` by the daemon; a service needs
    no queue (and no priority inversion) of its own."""

    DEFAULT = 63
    RANKS = {"interactive": 0, "normal": 1, "batch": 2}

    def __init__(self):
        self.limit = self.DEFAULT
        self.used = 0
        self._waiting: list = []       # heap of (rank, arrival, future)
        self._arrivals = itertools.count()

    async def _take(self, priority) -> None:
        if self.used < self.limit and not self._waiting:
            self.used += 1
            return
        turn = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (self.RANKS.get(priority, 1), next(self._arrivals), turn))
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():
                self._give()  # handed a slot just as it was cancelled: pass it on
            raise

    def _give(self) -> None:
        self.used -= 1
        while self._waiting and self.used < self.limit:
            turn = heapq.heappop(self._waiting)[2]
            if not turn.done():  # a cancelled waiter's future is done already
                self.used += 1
                turn.set_result(None)

    def hold_until(self, answer: asyncio.Future) -> None:
        """Keep one more slot until ``answer`` is done (a request given up here
        that the daemon still counts until it answers it)."""
        self.used += 1
        answer.add_done_callback(lambda _: self._give())

    @contextlib.asynccontextmanager
    async def turn(self, priority):
        await self._take(priority)
        try:
            yield
        finally:
            self._give()


class Client(_Methods):
    """Blocking client, one connection. Safe to share between threads: their
    requests take turns on the connection, one in flight at a time (for
    requests in parallel give each thread its own Client, or use
    :class:`AsyncClient`).

    It says ``hello`` when it connects and, if the daemon speaks protocol
    2, sends the ndarrays of ``input_data`` as binary attachments (from
    ``shm_min_bytes`` up in a sealed one-shot memfd, with ``transport``
    "auto" or "shm") and takes tensor results as attachments (or memfds:
    "shm"); against an older daemon it speaks v1 and sends them as base64.
    ``transport`` "attachments" never uses shared memory, "base64" never
    says hello. Either way ``result`` holds ndarrays (or, with
    ``decode=False``, v1 tensors as the daemon would send them to a v1
    client)."""

    def __init__(self, socket_path: str | None = None, *, timeout: float | None = None,
                 max_message_bytes: int = p.DEFAULT_MAX_MESSAGE_BYTES, reconnect_s: float = 0.0,
                 client_name: str | None = None, transport: str = "auto",
                 shm_min_bytes: int = t.DEFAULT_SHM_MIN_BYTES):
        super().__init__(socket_path, timeout=timeout, max_message_bytes=max_message_bytes,
                         reconnect_s=reconnect_s)
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.client_name = client_name or f"hailo_devmgr.client/{__version__}"
        self.transport = transport
        self.shm_min_bytes = 0 if transport == "shm" else shm_min_bytes
        self.protocol = 1
        self.features: frozenset = frozenset()   # what the daemon offered in hello, and this client uses
        self._sock: socket.socket | None = None
        self._reader: codec.FrameReader | None = None   # the connection's frames, read ahead included
        self._lock = threading.RLock()   # one request (and one connect or close) at a time

    def connect(self) -> "Client":
        with self._lock:
            started = time.monotonic()
            while True:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                try:
                    sock.connect(self.socket_path)
                    break
                except OSError as exc:
                    sock.close()
                    if not self._keep_trying(started, exc):
                        raise _refused(exc, self.socket_path) from exc
                    time.sleep(RECONNECT_POLL_S)
            self.close()
            self._sock = sock
            self._reader = codec.FrameReader(self.max_message_bytes)
            if self.transport != "base64":
                try:
                    self._negotiate()
                except BaseException:
                    self.close()
                    raise
            return self

    def _negotiate(self) -> None:
        """hello: protocol 2 when the daemon speaks it, else stay on v1."""
        receives, sends = {"auto": (["attachments"], {"attachments", "shm"}),
                           "shm": (["attachments", "shm"], {"attachments", "shm"}),
                           "attachments": (["attachments"], {"attachments"})}[self.transport]
        # An id of its own: the requests' ids stay 1, 2, ... as before hello existed.
        hello = _build("hello", "hello", {"protocol": p.PROTOCOL_MAX, "client": self.client_name,
                                          "features": receives})
        try:
            send_all(self._sock, [p.encode_frame(hello)])
        except OSError as exc:
            answer = self._unread_answer()   # a refusal written before closing (busy)
            if answer is None:
                raise NotConnected(f"connection to {self.socket_path} closed before the request was "
                                   f"sent: {exc}") from exc
        else:
            answer = self._receive()
        try:
            answer = _check(hello, answer, False)
        except DeviceError as exc:
            if not _unknown_action(exc):
                raise
            return  # an older daemon: v1
        self.protocol = int(answer.get("protocol", 1)) if isinstance(answer.get("protocol"), int) else 1
        if self.protocol >= 2:
            self.features = frozenset(answer.get("features") or ()) & frozenset(sends)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            self.protocol = 1
            self.features = frozenset()

    def __enter__(self):
        return self.connect()

    def __exit__(self, *exc_info):
        self.close()

    def request(self, action: str, _decode: bool = True, **fields) -> dict:
        """Send one request (``action`` and its fields) and return its answer."""
        with self._lock:
            message = _build(action, next(self._ids), fields)
            try:
                refusal = self._deliver(message)
                answer = refusal if refusal is not None else self._receive()
            except BaseException:
                self.close()  # cut short (an interrupt, a signal): its answer would be read as the next's
                raise
            if answer.get("request_id") not in (None, message["request_id"]):
                self.close()  # out of step: never read another answer on this connection
            if not _decode and "result" in answer:
                answer["result"] = encode_results(answer["result"])   # as a v1 client gets it
            return _check(message, answer, _decode)

    def generate(self, model_path: str, input_data: Any, model_type: str,
                 model_params: dict | None = None, keep_alive: float | str | None = None,
                 **scheduling) -> "Generation":
        """Text as a generative model (llm, vlm, vlm_chat) makes it:
        ``for text in client.generate(...)``, then ``.result`` is the final
        answer. The connection is this generation's until the loop ends;
        leaving it early closes the connection, which stops the generation
        (the next request opens a new one). ``timeout`` bounds each wait for
        the next piece. Against a daemon without protocol 2 the whole text
        comes as one piece."""
        fields = {"keep_alive": keep_alive, **scheduling,
                  **_model_fields(model_path, model_type, model_params, input_data)}
        return Generation(self, {key: value for key, value in fields.items() if value is not None})

    def _streamed(self, fields: dict):
        """Yields ("chunk", text) ..., then ("final", answer), holding the connection."""
        with self._lock:
            if self._sock is None:
                self.connect()
            message = _build("infer", next(self._ids), {**fields, "stream": True})
            finished = False
            try:
                refusal = self._deliver(message)
                answer = refusal if refusal is not None else self._receive()
                while answer.get("stream") is True and answer.get("done") is False \
                        and answer.get("request_id") == message["request_id"]:
                    yield "chunk", answer.get("chunk", "")
                    answer = self._receive()
                if answer.get("request_id") not in (None, message["request_id"]):
                    self.close()  # out of step: never read another answer on this connection
                finished = True
                yield "final", _check(message, answer, True)
            finally:
                if not finished:
                    self.close()   # left early or interrupted: the daemon stops the generation

    def _encode(self, message: dict) -> tuple[list, list[int]]:
        """(buffers, fds) for a request on this connection: its ndarrays as
        attachments or memfds with protocol 2, as base64 with v1."""
        if "attachments" not in self.features or not _has_arrays(message.get("input_data")):
            return [_v1_frame(message)], []
        shm_min = self.shm_min_bytes if "shm" in self.features else None
        return codec.encode(message, shm_min_bytes=shm_min)

    def _deliver(self, message: dict) -> dict | None:
        """Send a whole request. A connection the daemon had closed (restart,
        idle) is replaced once: none of the request reached it. A refusal
        the daemon wrote before closing (busy, too_large) is returned."""
        for attempt in range(2):
            reused = self._sock is not None
            if not reused:
                self.connect()
            buffers, fds = self._encode(message)   # per connection: its protocol may differ
            try:
                send_all(self._sock, buffers, fds)
                return None
            except OSError as exc:
                refusal = self._unread_answer()
                self.close()
                if refusal is not None:
                    return refusal
                if not reused or attempt:
                    raise NotConnected(f"connection to {self.socket_path} closed before the request was "
                                       f"sent: {exc}") from exc
            finally:
                codec.close_fds(fds)   # the daemon has its own copies once sent
        return None

    def _receive(self) -> dict:
        try:
            frame = read_frame_blocking(self._sock, self._reader)
        except TimeoutError:
            self.close()  # a late answer would be read as the next request's
            raise RequestTimeout(f"no answer from {self.socket_path} within {self.timeout} s") from None
        except OSError as exc:
            self.close()
            raise ConnectionLost(f"connection to {self.socket_path} lost after the request was sent: "
                                 f"{exc}") from exc
        except p.RequestError as exc:
            self.close()  # the unread answer leaves the stream unusable
            if exc.code == p.TOO_LARGE:
                raise DeviceError(f"answer too large for this client: {exc.message}", p.TOO_LARGE) from None
            raise
        return _resolved(frame)

    def _unread_answer(self) -> dict | None:
        """An answer the daemon wrote before closing (a refusal), if there is one."""
        try:
            self._sock.settimeout(1.0)
            return _resolved(read_frame_blocking(self._sock, self._reader))
        except Exception:
            return None


def _text_of(answer: dict) -> str:
    result = answer.get("result")
    return result if isinstance(result, str) else str((result or {}).get("text", ""))


class Generation:
    """What :meth:`Client.generate` returns: iterate it for the text as it
    comes; afterwards ``result`` is the final answer (``result.text``,
    ``done_reason``, token counts and durations)."""

    def __init__(self, client: "Client", fields: dict):
        self._client, self._fields = client, fields
        self.result: dict | None = None

    def __iter__(self):
        client = self._client
        with client._lock:
            if client._sock is None:
                client.connect()
            if client.protocol < 2:
                self.result = client.request("infer", **self._fields)
                yield _text_of(self.result)
                return
            for kind, value in client._streamed(self._fields):
                if kind == "final":
                    self.result = value
                elif value:
                    yield value


class AsyncGeneration:
    """What :meth:`AsyncClient.generate` returns: ``async for`` it for the
    text as it comes; afterwards ``result`` is the final answer."""

    def __init__(self, client: "AsyncClient", fields: dict):
        self._client, self._fields = client, fields
        self.result: dict | None = None

    def __aiter__(self):
        return self._pieces()

    async def _pieces(self):
        client = self._client
        await client._connected()
        if client.protocol < 2:
            self.result = await client.request("infer", **self._fields)
            yield _text_of(self.result)
            return
        steps = client._streamed(self._fields)
        try:
            async for kind, value in steps:
                if kind == "final":
                    self.result = value
                elif value:
                    yield value
        finally:
            await steps.aclose()
