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
                   keep_alive: float | str | None = None):
        """``keep_alive``: seconds the model may stay idle (-1 forever, 0 unload
        after this request) or a duration like "10m"; None: the daemon's setting."""
        return self.request("load_model", keep_alive=keep_alive,
                            **_model_fields(model_path, model_type, model_params))

    def unload_model(self, model_path: str, model_type: str = "vlm"):
        return self.request("unload_model", model_path=model_path, model_type=model_type)

    def infer(self, model_path: str, input_data: Any, model_type: str = "vlm",
              model_params: dict | None = None, decode: bool = True,
              keep_alive: float | str | None = None):
        """Returns the response; ``result`` has ndarrays in place of tensors
        unless ``decode`` is False. ``keep_alive`` as for :meth:`load_model`."""
        return self.request("infer", _decode=decode, keep_alive=keep_alive,
                            **_model_fields(model_path, model_type, model_params, input_data))


class AsyncClient(_Methods):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lock = asyncio.Lock()  # v1: one request in flight per connection
        self._reader = self._writer = None

    async def connect(self) -> "AsyncClient":
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(self.socket_path)
        except OSError as exc:
            raise DaemonUnreachable(f"cannot connect to {self.socket_path}: {exc.strerror or exc}") from exc
        return self

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
            self._writer = self._reader = None

    async def __aenter__(self):
        return await self.connect()

    async def __aexit__(self, *exc_info):
        await self.close()

    async def request(self, action: str, _decode: bool = True, **fields) -> dict:
        if self._writer is None:
            await self.connect()
        async with self._lock:
            message = _build(action, next(self._ids), fields)
            return _check(message, await asyncio.wait_for(self._exchange(message), self.timeout), _decode)

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
