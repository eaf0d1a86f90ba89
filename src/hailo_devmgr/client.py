"""Client library for services that use the device manager.

Two clients with the same methods: :class:`AsyncClient` (asyncio, async
context manager) and :class:`Client` (blocking, for scripts). Both speak
protocol v1, so they work with every version of the daemon. Errors from
the daemon raise :class:`DeviceError` with its ``code``; a daemon that
cannot be reached raises :class:`DaemonUnreachable`.

    from hailo_devmgr.client import Client, tensor
    with Client() as dm:
        dm.load_model("/usr/share/hailo-models/clip.hef", model_type="clip")
        emb = dm.infer("/usr/share/hailo-models/clip.hef", {"mode": "image", "tensor": tensor(img)},
                       model_type="clip")["result"]
"""
from __future__ import annotations

import asyncio
import itertools
import os
import socket
from typing import Any

import numpy as np

from . import protocol as p
from ._version import __version__
from .tensors import decode_results, encode_v1

DEFAULT_SOCKET = "/run/hailo/device.sock"


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
    """No daemon answers on the socket (not running, no permission, closed)."""


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


def _answer_length(header: bytes, limit: int) -> int:
    try:
        return p.parse_length(header, limit)
    except p.RequestError as exc:
        raise DeviceError(f"answer too large for this client: {exc.message}", p.TOO_LARGE) from None


def _model_fields(model_path, model_type, model_params, input_data=None) -> dict:
    return {"model_path": model_path, "model_type": model_type,
            "model_params": model_params, "input_data": input_data}


class _Methods:
    """Settings and actions, written once; ``request`` is sync or async per client."""

    def __init__(self, socket_path: str | None = None, *, timeout: float | None = None,
                 max_message_bytes: int = p.DEFAULT_MAX_MESSAGE_BYTES):
        self.socket_path = socket_path or default_socket_path()
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._ids = itertools.count(1)

    def ping(self):
        return self.request("ping")

    def status(self):
        return self.request("status")

    def device_status(self):
        return self.request("device_status")

    def load_model(self, model_path: str, model_type: str = "vlm", model_params: dict | None = None,
                   keep_alive: float | str | None = None, **scheduling):
        """``keep_alive``: seconds the model may stay idle (-1 forever, 0 unload
        after this request) or a duration like "10m"; None: the daemon's setting.
        ``scheduling``: ``priority`` ("interactive", "normal", "batch") and
        ``timeout_ms`` (not started by then: a ``timeout`` error)."""
        return self.request("load_model", keep_alive=keep_alive, **scheduling,
                            **_model_fields(model_path, model_type, model_params))

    def unload_model(self, model_path: str, model_type: str = "vlm"):
        return self.request("unload_model", model_path=model_path, model_type=model_type)

    def infer(self, model_path: str, input_data: Any, model_type: str = "vlm",
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
    Cancelling a task that awaits a request cancels the request in the daemon."""

    def __init__(self, *args, pipelining: bool = True, client_name: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pipelining = pipelining
        self.client_name = client_name or f"hailo_devmgr.client/{__version__}"
        self.protocol = 1
        self._lock = asyncio.Lock()         # v1: one request in flight per connection
        self._write_lock = asyncio.Lock()   # v2: whole frames only
        self._pending: dict[int, asyncio.Future] = {}
        self._answers: asyncio.Task | None = None
        self._reader = self._writer = None

    async def connect(self) -> "AsyncClient":
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(self.socket_path)
        except OSError as exc:
            raise DaemonUnreachable(f"cannot connect to {self.socket_path}: {exc.strerror or exc}") from exc
        if self.pipelining:
            await self._negotiate()
        return self

    async def _negotiate(self) -> None:
        hello = _build("hello", next(self._ids), {"protocol": p.PROTOCOL_MAX, "client": self.client_name})
        try:
            answer = _check(hello, await asyncio.wait_for(self._exchange(hello), self.timeout), False)
        except DeviceError as exc:
            if exc.code != p.UNKNOWN_ACTION:
                raise
            return  # an older daemon: stay on v1
        self.protocol = int(answer.get("protocol", 1))
        if self.protocol >= 2:
            self._answers = asyncio.ensure_future(self._read_answers())

    async def close(self) -> None:
        if self._answers is not None:
            self._answers.cancel()
            await asyncio.gather(self._answers, return_exceptions=True)
            self._answers = None
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
            self._writer = self._reader = None
        self.protocol = 1

    async def __aenter__(self):
        return await self.connect()

    async def __aexit__(self, *exc_info):
        await self.close()

    async def metrics(self) -> dict:
        return await self.request("metrics")

    async def request(self, action: str, _decode: bool = True, **fields) -> dict:
        if self._writer is None:
            await self.connect()
        message = _build(action, next(self._ids), fields)
        if self.protocol >= 2:
            return _check(message, await self._pipelined(message), _decode)
        async with self._lock:
            return _check(message, await asyncio.wait_for(self._exchange(message), self.timeout), _decode)

    async def _pipelined(self, message: dict) -> dict:
        answer = asyncio.get_running_loop().create_future()
        self._pending[message["request_id"]] = answer
        try:
            await self._send(message)
            return await asyncio.wait_for(asyncio.shield(answer), self.timeout)
        except (asyncio.CancelledError, asyncio.TimeoutError):
            if self._writer is not None and not answer.done():  # tell the daemon not to bother
                asyncio.ensure_future(self._send_quietly(
                    _build("cancel", next(self._ids), {"target": message["request_id"]})))
            raise
        finally:
            self._pending.pop(message["request_id"], None)

    async def _send(self, message: dict) -> None:
        try:
            async with self._write_lock:
                self._writer.write(p.encode_frame(message))
                await self._writer.drain()
        except OSError as exc:
            raise DaemonUnreachable(f"connection to {self.socket_path} lost: {exc}") from exc

    async def _send_quietly(self, message: dict) -> None:
        try:
            await self._send(message)
        except DaemonUnreachable:
            pass

    async def _read_answers(self) -> None:
        """v2: hand each answer to the request waiting for its request_id."""
        error: Exception = DaemonUnreachable(f"connection to {self.socket_path} closed by the daemon")
        try:
            while True:
                header = await self._reader.readexactly(p.HEADER_SIZE)
                body = await self._reader.readexactly(_answer_length(header, self.max_message_bytes))
                answer = p.decode_body(body)
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

    async def _exchange(self, message: dict) -> dict:
        try:
            self._writer.write(p.encode_frame(message))
            await self._writer.drain()
            header = await self._reader.readexactly(p.HEADER_SIZE)
            body = await self._reader.readexactly(_answer_length(header, self.max_message_bytes))
        except (OSError, asyncio.IncompleteReadError) as exc:
            await self.close()
            raise DaemonUnreachable(f"connection to {self.socket_path} lost: {exc}") from exc
        except DeviceError:
            await self.close()  # the unread answer leaves the stream unusable
            raise
        return p.decode_body(body)


class Client(_Methods):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sock: socket.socket | None = None

    def connect(self) -> "Client":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise DaemonUnreachable(f"cannot connect to {self.socket_path}: {exc.strerror or exc}") from exc
        self._sock = sock
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self.connect()

    def __exit__(self, *exc_info):
        self.close()

    def request(self, action: str, _decode: bool = True, **fields) -> dict:
        if self._sock is None:
            self.connect()
        message = _build(action, next(self._ids), fields)
        try:
            self._sock.sendall(p.encode_frame(message))
            header = self._recv_exactly(p.HEADER_SIZE)
            body = self._recv_exactly(_answer_length(header, self.max_message_bytes))
        except OSError as exc:
            self.close()
            raise DaemonUnreachable(f"connection to {self.socket_path} lost: {exc}") from exc
        except DeviceError:
            self.close()  # the unread answer leaves the stream unusable
            raise
        return _check(message, p.decode_body(body), _decode)

    def _recv_exactly(self, size: int) -> bytes:
        buffer = bytearray(size)
        view = memoryview(buffer)
        received = 0
        while received < size:
            count = self._sock.recv_into(view[received:])
            if count == 0:
                raise ConnectionResetError("the daemon closed the connection")
            received += count
        return bytes(buffer)
