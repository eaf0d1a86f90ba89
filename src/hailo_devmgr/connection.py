"""One client connection: reading frames, writing answers, and its lifetime.

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
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from . import protocol as p
from .protocol import RequestError

log = logging.getLogger(__name__)

INLINE_PARSE_BYTES = 256 * 1024  # larger bodies are parsed in a worker thread
_connection_ids = itertools.count(1)


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection (SO_PEERCRED)."""

    pid: int | None
    uid: int | None
    gid: int | None

    @classmethod
    def of(cls, sock: socket.socket | None) -> "Peer":
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return cls(*struct.unpack("3i", creds))
        except (OSError, AttributeError):
            return cls(None, None, None)

    def log_fields(self) -> dict:
        return {"CLIENT_PID": self.pid, "CLIENT_UID": self.uid}

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


class ByteBudget:
    """Bounds the request bytes held in memory across all connections.

    A reader waits for room before reading a body, so many large messages
    slow their senders down instead of exhausting the unit's MemoryMax.
    ``release`` is synchronous so it is safe in any ``finally``.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._waiters: list[asyncio.Future] = []

    async def acquire(self, size: int) -> None:
        while self.used and self.used + size > self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        self.used += size

    def release(self, size: int) -> None:
        self.used -= size
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class Connection:
    def __init__(self, server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.id = next(_connection_ids)
        self.peer = Peer.of(writer.get_extra_info("socket"))
        self.protocol = 1
        self.client_label: str | None = None
        self.default_priority: str | None = None
        self.unit = self.peer.unit()      # systemd unit of the peer, read once
        self.inflight: dict = {}        # request_id -> Job (None while validated), for cancel
        self.cancel_requested: set = set()
        self._reader, self._writer = reader, writer
        self._write_lock = asyncio.Lock()
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._tasks: set[asyncio.Task] = set()

    @property
    def client_key(self):
        """Fairness key: the peer process (more connections buy no more share)."""
        return self.peer.pid if self.peer.pid is not None else f"connection {self.id}"

    async def run(self) -> None:
        in_order = asyncio.ensure_future(self._answer_in_order())
        try:
            while True:
                frame = await self._read_frame()
                if frame is None:
                    break
                if self.protocol >= 2:
                    self._spawn(frame)
                else:
                    await self._inbox.put(frame)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            # Its queued device work never runs; a running job's answer is dropped.
            self.server.client_gone(self)
            in_order.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(in_order, *self._tasks, return_exceptions=True)
            self._writer.close()

    async def _read_frame(self) -> tuple[bytes, int] | None:
        """(body, length) of the next frame; None when the connection must end.

        Once a frame's first byte has come, all of it must follow within
        ``frame_timeout_s``: a client that stalls mid-frame is cut off and
        the memory reserved for its body is given back."""
        config = self.server.config
        try:
            first = await asyncio.wait_for(self._reader.readexactly(1), config.idle_timeout_s or None)
        except asyncio.IncompleteReadError:
            return None  # closed between frames: the normal end
        except asyncio.TimeoutError:
            log.info("closing a connection idle for %g s", config.idle_timeout_s, extra=self.peer.log_fields())
            return None
        frame_deadline = asyncio.get_running_loop().time() + config.frame_timeout_s
        try:
            header = first + await self._within(frame_deadline, self._reader.readexactly(p.HEADER_SIZE - 1))
        except asyncio.IncompleteReadError:
            log.warning("client sent a truncated frame header and closed", extra=self.peer.log_fields())
            return None
        except asyncio.TimeoutError:
            return self._stalled()
        try:
            length = p.parse_length(header, self.server.config.max_message_bytes)
        except RequestError as error:
            log.warning("refused a frame: %s", error.message, extra={**self.peer.log_fields(), "CODE": error.code})
            await self.send(p.error_response(None, error))
            return None
        await self.server.budget.acquire(length)
        # Waiting for memory is our doing, not the client's: the clock restarts.
        frame_deadline = asyncio.get_running_loop().time() + config.frame_timeout_s
        try:
            return await self._within(frame_deadline, self._reader.readexactly(length)), length
        except asyncio.IncompleteReadError:
            log.warning("client closed in the middle of a %d-byte frame", length, extra=self.peer.log_fields())
            self.server.budget.release(length)
            return None
        except asyncio.TimeoutError:
            self.server.budget.release(length)
            return self._stalled()
        except BaseException:
            self.server.budget.release(length)
            raise

    @staticmethod
    async def _within(deadline: float, reading):
        return await asyncio.wait_for(reading, max(0.0, deadline - asyncio.get_running_loop().time()))

    def _stalled(self) -> None:
        log.warning("closing a connection that stalled mid-frame for %g s (frame_timeout_s)",
                    self.server.config.frame_timeout_s, extra={**self.peer.log_fields(), "CODE": "timeout"})
        return None

    def describe(self) -> dict:
        """This client, for `status`."""
        return {"pid": self.peer.pid, "uid": self.peer.uid, "unit": self.unit, "client": self.client_label,
                "protocol": self.protocol, "in_flight": len(self.inflight)}

    def _spawn(self, frame: tuple[bytes, int]) -> None:
        if len(self._tasks) >= self.server.config.scheduling.max_inflight_per_connection:
            task = asyncio.ensure_future(self._refuse_busy(frame))
        else:
            task = asyncio.ensure_future(self._answer(frame))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_in_order(self) -> None:
        while True:
            frame = await self._inbox.get()
            await self._answer(frame)

    async def _answer(self, frame: tuple[bytes, int]) -> None:
        body, length = frame
        try:
            response = await self.server.answer(body, self)
            await self.send(response)
        finally:
            self.server.budget.release(length)

    async def _refuse_busy(self, frame: tuple[bytes, int]) -> None:
        body, length = frame
        try:
            error = RequestError(p.BUSY, "Too many requests in flight on this connection", retry_after_ms=50)
            message = None
            try:
                message = p.decode_body(body)
            except RequestError:
                pass
            await self.send(self.server.error_answer(None, message, error, self))
        finally:
            self.server.budget.release(length)

    def close(self) -> None:
        self._writer.close()

    async def send(self, response: dict) -> None:
        frame = p.encode_frame(response)
        async with self._write_lock:
            self._writer.write(frame)
            await self._writer.drain()

    async def decode(self, body: bytes) -> dict:
        if len(body) > INLINE_PARSE_BYTES:
            return await asyncio.to_thread(p.decode_body, body)
        return p.decode_body(body)
